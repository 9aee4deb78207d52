"""Console entry points (``sami-*``): each parses its arguments, calls one library function and maps
``SamiError`` to one line on stderr with exit code 2.
"""
