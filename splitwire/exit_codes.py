"""The exit codes sft-export, sft-edge and sft-cloud share, and the one place that picks them.

Why it exists: a script that runs the commands must tell "fix what the message says" from
"run it again later" without reading messages, the same way for all three. Errors splitft
raises on purpose (``SplitftError``) and the environment's (``OSError``: a missing or
unreadable file, a port in use) end in one line on stderr; any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

from splitwire.errors import SplitftError

OK = 0
FAILED = 1  # will fail again as it is: bad input, file, bundle, checkpoint or token
USAGE = 2  # argparse's: the command line itself is wrong
TRY_AGAIN = 75  # sysexits' EX_TEMPFAIL: a retryable error (the cloud unreachable or busy)
INTERRUPTED = 130  # 128 + SIGINT, as shells report it

EPILOG = f"""exit status: {OK} done; {FAILED} failed, fix what the message says (input, file, bundle, checkpoint,
token); {USAGE} bad command line; {TRY_AGAIN} the cloud could not be reached or was busy, run it again later;
{INTERRUPTED} interrupted. Any other failure prints a traceback: a bug, please report it.
"""


def exit_code(prog: str, command: Callable[[], object], *, interrupted: str = "interrupted") -> int:
    """Run ``command``; its failure as one ``prog: error: …`` line on stderr and its exit code."""
    try:
        command()
    except SplitftError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return TRY_AGAIN if exc.retryable else FAILED
    except OSError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return INTERRUPTED
    return OK
