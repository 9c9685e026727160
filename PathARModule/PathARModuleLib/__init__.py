"""PathAR module internals: logic (Qt-free), offscreen rendering, GUI widget."""
