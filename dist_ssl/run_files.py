"""Names of the files a run directory holds, defined once.

The trainer writes them; evaluation, fine-tuning (``method.init_from``), the experiment runner,
its reports and plots read them. When writer and readers each spelled a name, renaming one file
meant finding every copy (``backbone.safetensors`` was defined three times); here a rename is
one line. Nothing is imported: any layer of the package may use these names.

    <output_dir>/
        config.yaml            the resolved config (also inside each checkpoint)
        run.json               derived values of this launch: backend, world size, lr, steps
        log.jsonl              metrics, one JSON object per logged step (``metrics.jsonl_name``)
        eval.json              the last validation result (runs with ``data.val``)
        backbone.safetensors   the backbone export timm can load
        head.safetensors       a supervised run's classifier head, beside the backbone
        eval_probe.json        ``dist-ssl-eval``'s k-NN / linear-probe metrics (its default --out)
        stage.json, stage.log  the experiment runner's record and output of this stage
        checkpoints/step_XXXXXXXX/
"""

CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run.json"
METRICS_LOG_FILE = "log.jsonl"
EVAL_FILE = "eval.json"
BACKBONE_FILE = "backbone.safetensors"
HEAD_FILE = "head.safetensors"
PROBE_FILE = "eval_probe.json"
STAGE_STATUS_FILE = "stage.json"
STAGE_LOG_FILE = "stage.log"
CHECKPOINTS_DIR = "checkpoints"
