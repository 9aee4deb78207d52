"""Expert iteration: the driver that runs rollout, alignment, export and evaluation per iteration
(``sami-iterate``), and the report of a finished run.
"""
