"""Launching a test's worker script as two processes (torch.distributed.run, gloo on the CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def run_two_processes(script: str, *args: str, cwd: str, timeout: float) -> None:
    """Run ``script args`` on 2 local processes; fail with the log's tail if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Its own session, so that on a timeout the launcher and both workers can be killed together.
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         script, *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env,
        start_new_session=True,
    )
    try:
        log, _ = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        log, _ = launcher.communicate()
    assert launcher.returncode == 0, log[-4000:]
