"""``sami-serve``: an OpenAI-compatible server for one HF model directory (FastAPI on uvicorn).

    sami-serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--served-model-name NAME]
        [--api-key-env VAR] [--max-tokens 1024] [--max-body-bytes 1048576] [--dtype auto]
        [--max-queue 16] [--backlog 2048]

Clients use http://HOST:PORT/v1 as their base URL (chat completions, completions, models); the
first line on stdout names it once the socket listens (``--port 0`` picks a free port; an IPv6
host such as ::1 is printed in brackets). Binding to anything but loopback requires
--api-key-env: the name of a variable that holds the key clients must send as
"Authorization: Bearer <key>". One request generates at a time; up to --max-queue more wait, and
beyond that requests are answered 503 with Retry-After. SIGTERM or Ctrl-C stops it (exit 0).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from megatron_sami.cli.common import fail, run_main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sami-serve", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--host", default="127.0.0.1", help="an address or name; IPv6 as ::1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    parser.add_argument("--served-model-name")
    parser.add_argument("--api-key-env", help="name of the environment variable holding the API key")
    parser.add_argument("--max-tokens", type=int, default=1024, help="the most new tokens a request may ask for")
    parser.add_argument("--default-max-tokens", type=int, help="when a request gives none (min(256, --max-tokens))")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--max-prompt-tokens", type=int, default=8192)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--max-queue", type=int, default=16,
                        help="requests that may wait for the model; more are answered 503 with Retry-After")
    parser.add_argument("--backlog", type=int, default=2048, help="connections the socket queues before accepting")
    return parser


@run_main
def main(argv: list[str] | None = None) -> int:
    """``sami-serve MODEL_DIR``: serve a local HF model over the OpenAI API until interrupted."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s sami-serve] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    from megatron_sami.runtime import quiet
    from megatron_sami.serving.openai_server import ServeConfig, base_url, bind, make_server

    quiet.install()
    cfg = ServeConfig(model_dir=args.model_dir, host=args.host, port=args.port,
                      served_model_name=args.served_model_name, api_key_env=args.api_key_env,
                      max_tokens=args.max_tokens, default_max_tokens=args.default_max_tokens,
                      max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                      dtype=args.dtype, max_queue=args.max_queue, backlog=args.backlog)
    try:
        sock = bind(cfg)
    except OSError as err:  # a taken port, an unknown host; a SamiError is mapped by run_main
        fail(f"cannot listen on {cfg.host} port {cfg.port} ({err.strerror or err}); choose another --port "
             f"(0: any free one) or --host.")
    server = make_server(cfg, sock)
    # uvicorn stops gracefully on SIGTERM, then re-raises it under the handler found at start:
    # a no-op here, so the process ends with exit code 0 rather than being killed by the signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    print(f"sami-serve: serving '{cfg.name}' at {base_url(sock)}", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
