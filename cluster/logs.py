"""What reaches a log: the one place third-party chatter is turned down (`quiet_third_party`, called at CLI
start-up). FMRILM_VERBOSE=1 keeps everything.

Turned down, because a user reading a SLURM or Ray Jobs log cannot act on them:
- Python warnings about other libraries' futures (Deprecation / PendingDeprecation / Future) and numpy's
  all-NaN-slice RuntimeWarnings (a descriptor missing for a whole cohort is recorded in `desc.json` already);
  any other warning is shown once per message, not once per scan;
- progress bars of transformers / huggingface_hub / datasets / tqdm (ours print plain lines off a terminal);
- transformers' and datasets' INFO and advisory messages (errors still show);
- DeepSpeed's INFO lines and its "Setting accelerator to CPU" notice on machines with no NVIDIA device;
- Ray's "Started a local Ray instance" banner (RAY_LOGGER_LEVEL=warning), its notice that token
  authentication is on by default, and the colour codes around its worker prefixes in a log file.

Most of it is environment variables, set only where the user has not set them, so child processes (Ray tasks
and Train workers started from this process, torchrun ranks) inherit them; `QUIET_ENV` lists them for a job's
runtime env on a remote cluster, whose workers were started by `ray start`, not by this process.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "FMRILM_VERBOSE"

QUIET_ENV = {
    "PYTHONWARNINGS": ",".join(["ignore::DeprecationWarning", "ignore::PendingDeprecationWarning",
                                "ignore::FutureWarning"]),
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",   # also transformers' own bars ("Loading weights")
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",                   # bars that call tqdm directly (transformers' GGUF loader)
    "TOKENIZERS_PARALLELISM": "false",     # else every fork after a tokenizer ran prints a warning
    "RAY_LOGGER_LEVEL": "warning",         # default level of ray.init's driver logger: no start-up banner
}


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


_quieted = False


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def quiet_third_party() -> bool:
    """Turn third-party warnings, progress bars and INFO logs down to what a user needs; returns False (and
    changes nothing) when FMRILM_VERBOSE is set. Call once, early: before torch / transformers / ray load."""
    global _quieted
    if verbose():
        return False
    if _quieted:
        return True
    _quieted = True
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    if not sys.stderr.isatty():  # no colour codes around Ray's "(worker pid=...)" prefixes in a log file
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")

    # this process: the same filters as PYTHONWARNINGS (which Python read before we could set it); each
    # filterwarnings goes to the front of the list, so the ignores added last win over "once"
    warnings.filterwarnings("once")  # any other warning: each message once, not once per scan
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)

    # Loggers are fetched before their libraries create them: a filter survives their set-up (DeepSpeed and
    # Ray set levels and handlers at import / ray.init, which would undo a level set here).
    deepspeed = logging.getLogger("DeepSpeed")
    deepspeed.addFilter(_BelowWarning())
    if not os.path.exists("/dev/nvidiactl"):  # on an NVIDIA machine the notice means CUDA is broken: keep it
        deepspeed.addFilter(_DropMessages("Setting accelerator to CPU"))
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        _DropMessages("Token authentication is enabled for this Ray cluster"))
    return True
