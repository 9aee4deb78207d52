"""``sami-serve``: an OpenAI-compatible server for one HF model directory.

    sami-serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--served-model-name NAME]
        [--api-key-env VAR] [--max-tokens 1024] [--max-body-bytes 1048576] [--dtype auto]

Clients use http://HOST:PORT/v1 as their base URL (chat completions, completions, models).
Binding to anything but loopback requires --api-key-env: the name of a variable that holds the
key clients must send as "Authorization: Bearer <key>".
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from megatron_sami.cli.common import fail, run_main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sami-serve", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    parser.add_argument("--served-model-name")
    parser.add_argument("--api-key-env", help="name of the environment variable holding the API key")
    parser.add_argument("--max-tokens", type=int, default=1024, help="the most new tokens a request may ask for")
    parser.add_argument("--default-max-tokens", type=int, help="when a request gives none (min(256, --max-tokens))")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--max-prompt-tokens", type=int, default=8192)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    return parser


@run_main
def main(argv: list[str] | None = None) -> int:
    """``sami-serve MODEL_DIR``: serve a local HF model over the OpenAI API until interrupted."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s sami-serve] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    from megatron_sami.runtime import quiet
    from megatron_sami.serving.openai_server import ServeConfig, make_server

    quiet.install()
    try:
        cfg = ServeConfig(model_dir=args.model_dir, host=args.host, port=args.port,
                          served_model_name=args.served_model_name, api_key_env=args.api_key_env,
                          max_tokens=args.max_tokens, default_max_tokens=args.default_max_tokens,
                          max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                          dtype=args.dtype)
        server = make_server(cfg)
    except OSError as err:  # e.g. the port is taken; a SamiError is mapped by run_main
        fail(str(err))
    host, port = server.server_address[:2]
    # SIGTERM (kill, Slurm) stops serving cleanly; shutdown() must come from another thread.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"sami-serve: serving '{cfg.name}' at http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
