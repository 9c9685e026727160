"""PathoSyn Slicer module library: Qt-free logic (logic.py), parameter node (parameters.py), background runner
(process.py) and the Qt widget (widget.py, imported only inside Slicer)."""
