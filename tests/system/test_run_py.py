"""run.py fails in one line, before any data is read, on a broken config rule, a misspelt field
or a workdir it cannot write (exit status 2)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args,line", [
    (["--config.data.canvas=128"],
     "Config error: config.data.canvas must be (height, width), each a positive multiple of 32"),
    (["--config.train.log_every_steps=0"],
     "Config error: config.train.log_every_steps must be >= 1, got 0"),
    (["--config.data.max_instances=0"],
     "Config error: config.data.max_instances must be >= 1, got 0"),
    (["--config.train.base_lr=nan"],
     "Config error: config.train.base_lr must be a finite number, got nan"),
    (["--config.train.nums_steps=3"],
     "FATAL Flags parsing error: --config.train.nums_steps: no such config field (did you "
     "mean 'num_steps'?)"),
    (["--workdir=/proc/df2_jax_test/run"],
     "Config error: --workdir /proc/df2_jax_test/run cannot be created or written"),
])
def test_run_py_fails_in_one_line_before_reading_data(tmp_path, args, line):
  data = tmp_path / "data"
  cmd = [sys.executable, "run.py", "--config", "configs/tiny.py", "--workdir",
         str(tmp_path / "run"), f"--config.data.synthetic_dir={data}"] + args
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines()
           if l.startswith(("Config error", "FATAL"))]
  assert len(lines) == 1 and lines[0].startswith(line), proc.stderr[-3000:]
  assert not data.exists()  # nothing generated or read
