"""PathoSyn in the browser (trame-slicer). Entry point: PathoSynWeb.py (`pathosyn-web`)."""
