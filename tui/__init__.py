"""segflow-tui: the Textual client of segflowd's control socket (``segflow_tui.app:main``).

``backend`` is its only channel to a daemon (the control socket); ``testing`` holds a
fixed-data backend for snapshots and demos.
"""
