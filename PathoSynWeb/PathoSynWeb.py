"""PathoSyn in the browser: `pathosyn-web --port 8080` (or `python PathoSynWeb/PathoSynWeb.py`) serves the page on
127.0.0.1. Everything lives in PathoSynWebLib/ (app, views, panel, Qt-free controller)."""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `PathoSynWeb` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PathoSynWeb.PathoSynWebLib.app import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
