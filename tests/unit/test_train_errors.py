"""One-line errors of the training entry point, and its quiet third-party logs."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dist_ssl.config import ConfigError, load_config
from dist_ssl.engine.metrics import MetricsConfig, build_sinks
from dist_ssl.engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "supervised_fmnist2k.yaml"


@pytest.mark.parametrize("name", ["..", ".", "../x.jsonl", "a/b.jsonl", "", "x\0y"])
def test_metrics_file_name_must_stay_in_the_run_dir(name):
    with pytest.raises(ValueError, match="^jsonl_name: must be a plain file name inside the run dir"):
        MetricsConfig(jsonl_name=name).validate()


def test_metrics_file_name_override_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(RECIPE, [f"output_dir={tmp_path / 'run'}", "metrics.jsonl_name=.."])
    assert str(err.value) == "metrics.jsonl_name: must be a plain file name inside the run dir, got '..'"


@pytest.mark.parametrize("below", [False, True])
def test_output_dir_that_is_a_file_is_refused_before_anything_is_built(tmp_path, below):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    out = a_file / "run" if below else a_file
    cfg = load_config(RECIPE, [f"output_dir={out}", f"data.train={tmp_path / 'no_shards'}"])
    with pytest.raises(ConfigError) as err:  # before the data is even looked at
        Trainer(cfg)
    what = f"is inside {a_file}, an existing file" if below else "is an existing file"
    assert str(err.value) == f"output_dir: {out} {what}, not a directory; choose a directory path"


def test_prometheus_port_in_use_is_a_one_line_config_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = MetricsConfig(prometheus=True, prometheus_port_base=port - 1)
        with pytest.raises(ConfigError) as err:
            build_sinks(cfg, tmp_path, run="r", rank=1, local_rank=1, is_main=False)
    assert str(err.value) == (f"metrics.prometheus_port_base: port {port} on 127.0.0.1 is already in use (local rank 1 "
                              "uses base + 1); choose another base or stop the process holding it")


@pytest.mark.parametrize("host, why", [("no-such-host.invalid", "cannot resolve 'no-such-host.invalid'"),
                                       ("192.0.2.1", "'192.0.2.1' is not an address of this machine")])
def test_prometheus_bad_host_is_a_one_line_config_error(tmp_path, host, why):
    cfg = MetricsConfig(prometheus=True, prometheus_port_base=9400, prometheus_host=host)
    with pytest.raises(ConfigError) as err:
        build_sinks(cfg, tmp_path, run="r", rank=0, local_rank=0, is_main=True)
    msg = str(err.value)
    assert msg.startswith(f"metrics.prometheus_host: {why}") and "\n" not in msg, msg


LOG_PROBE = """
import logging, sys
from dist_ssl.engine.cli_train import setup_logging
setup_logging(verbose=len(sys.argv) > 1)
logging.getLogger("accelerate.accelerator").info("accelerate-info")
logging.getLogger("torch.distributed.elastic").info("torch-info")
logging.getLogger("accelerate.checkpointing").warning("accelerate-warning")
ds = logging.getLogger("DeepSpeed")  # DeepSpeed's own logger: own handler, resets its level on import
ds.setLevel(logging.INFO)
ds.propagate = False
ds.addHandler(logging.StreamHandler(sys.stderr))
ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
ds.warning("deepspeed-warning")
logging.getLogger("dist_ssl.engine.trainer").info("ours")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_logs_stay_at_warning_unless_verbose(verbose):
    args = [sys.executable, "-c", LOG_PROBE] + (["-v"] if verbose else [])
    err = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120).stderr
    assert "ours" in err and "accelerate-warning" in err and "deepspeed-warning" in err, err
    for noise in ("accelerate-info", "torch-info", "Setting accelerator to CPU"):
        assert (noise in err) == verbose, (noise, err)
