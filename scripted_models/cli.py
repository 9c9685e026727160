"""`pathosyn` command. Subcommands register themselves; errors are one line on stderr, exit code 2; warnings one
line on stderr too (`pathosyn: warning: ...`; report.json keeps the engine's).

Progress: tqdm for people (stderr), or `--progress jsonl` for machines (one JSON object per line on stdout:
{"event": "progress", "fraction": 0.4, "message": "..."}, then {"event": "done", ...}).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable

EXIT_BAD_INPUT = 2
EXIT_OS_ERROR = 1  # reading or writing files failed


class Progress:
    """Callable progress(fraction, message) that prints JSON lines or drives a tqdm bar."""

    active: list[Progress] = []

    def __init__(self, mode: str = "auto"):
        if mode == "auto":
            mode = "tqdm" if sys.stderr.isatty() else "none"
        self.mode, self.bar = mode, None
        Progress.active.append(self)

    def __call__(self, fraction: float, message: str = "") -> None:
        if self.mode == "jsonl":
            print(json.dumps({"event": "progress", "fraction": round(float(fraction), 4), "message": message}),
                  flush=True)
        elif self.mode == "tqdm":
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=1000, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}")
            self.bar.set_description_str(message[:40])
            self.bar.n = int(1000 * min(1.0, fraction))
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.leave = False
            self.bar.close()
            self.bar = None

    def done(self, **payload) -> None:
        self.close()
        if self.mode == "jsonl":
            print(json.dumps({"event": "done", **payload}), flush=True)
        else:
            print(json.dumps(payload, indent=1))


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--progress", choices=["auto", "tqdm", "jsonl", "none"], default="auto",
                        help="auto: a tqdm bar on a terminal, nothing otherwise; jsonl: JSON lines on stdout")


def _registrars() -> list[Callable]:
    from .pathosyn import commands as pathosyn_commands

    registrars = [pathosyn_commands.register]
    try:
        from .pathar import commands as pathar_commands

        registrars.append(pathar_commands.register)
    except ImportError:
        pass
    for optional in ("batch", "evaluation.commands", "doctor"):
        try:
            module = __import__(f"scripted_models.{optional}", fromlist=["register"])
            registrars.append(module.register)
        except (ImportError, AttributeError):
            pass
    return registrars


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="pathosyn", description="Synthesise brain lesions in MRI (PathoSyn, PathAR).")
    parser.add_argument("--version", action="version", version=f"pathosyn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _registrars():
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import InputError, WeightsError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)

    def fail(message: str, code: int) -> int:
        for progress in Progress.active:
            progress.close()
        if getattr(args, "progress", None) == "jsonl":
            print(json.dumps({"event": "error", "message": message}), flush=True)
        print(f"pathosyn: error: {message}", file=sys.stderr)
        return code

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return int(args.func(args) or 0)
    except (InputError, WeightsError) as exc:
        return fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, EXIT_BAD_INPUT)
    except OSError as exc:  # the file system failed (full disk, no permission): one line, not a traceback
        return fail(f"{exc.strerror or type(exc).__name__}{f': {exc.filename}' if exc.filename else ''}",
                    EXIT_OS_ERROR)
    except KeyboardInterrupt:
        print("pathosyn: interrupted", file=sys.stderr)
        return 130


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr (`pathosyn: warning: ...`), not Python's file, line and source."""
    from tqdm import tqdm

    text = str(message).strip().splitlines()
    tqdm.write(f"pathosyn: warning: {text[0] if text else category.__name__}", file=file or sys.stderr)  # above a bar


def entry() -> None:
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    _run_with_fast_allocator()
    sys.exit(main())


def _run_with_fast_allocator() -> None:
    """Restart this command (same process id) with tcmalloc preloaded when it is installed and not loaded, as the
    engine worker runs: PyTorch's CPU convolutions allocate large buffers at every step (64^3 click on 2 cores:
    3.5 -> 2.6 s). Before torch is imported; PATHOSYN_TCMALLOC=0 turns it off."""
    from .worker import with_fast_allocator

    env = with_fast_allocator(dict(os.environ))
    if env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD") and getattr(sys, "orig_argv", None):
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


if __name__ == "__main__":
    entry()
