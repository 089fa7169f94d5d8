"""Hugging Face <-> llm_jax run directories (GPT-2 and Llama checkpoints).

Import a local Hugging Face directory (config.json, *.safetensors, tokenizer.json) as a run,
fine-tune it, and write it back:

    python -m llm_jax.convert from_hf --hf_dir /models/gpt2 --workdir runs/gpt2_ft
    python -m llm_jax.main --config configs/hf_finetune.py:runs/gpt2_ft --workdir runs/gpt2_ft \
        --config.data.path=../shared/data/tinyshakespeare/input.txt
    python -m llm_jax.convert to_hf --workdir runs/gpt2_ft --hf_dir runs/gpt2_ft_hf

`from_hf` writes workdir/config.json, workdir/tokenizer/ (tokenizer.json with the checkpoint's
tokenizer_config.json, special_tokens_map.json, chat_template.jinja: special tokens, BOS rule, chat
template), workdir/hf/ (the original config.json, generation_config.json) and
workdir/checkpoints/0, which `llm_jax.main` restores and trains from. The layer layout is part of
the checkpoint: pass `--scan_layers` here to fine-tune with `model.scan_layers=True`. `--mesh`
(data,fsdp,tensor; -1 fills in) is where the weights are placed while converting; the checkpoint
restores onto any mesh. `to_hf` writes the latest checkpoint (or `--step`) as config.json +
model.safetensors (+ tokenizer.json and its files), loadable with transformers' `from_pretrained`.

A LoRA run (configs/lora.py) leaves as a plain run or a Hugging Face directory
(llm_jax/interop/lora_export.py):

    python -m llm_jax.convert merge --workdir runs/lora --out_workdir runs/merged   # adapters merged in
    python -m llm_jax.convert to_hf --workdir runs/lora --hf_dir runs/lora_hf       # the merged model
    python -m llm_jax.convert to_hf --workdir runs/lora --hf_dir runs/lora_peft --peft  # PEFT's adapters

`merge` writes a new run (never into the LoRA run or its base; a QLoRA base is dequantized first)
that `llm_jax.main` resumes and `generate` / `to_hf` read. `to_hf --peft` writes adapter_config.json
+ adapter_model.safetensors, which `peft.PeftModel.from_pretrained(base_model, DIR)` loads.

`from_hf` writes a workdir, so it takes the workdir's lock like `llm_jax.main` (a workdir in use is
refused at once, naming the run that holds it) after checking it can write there; `to_hf` only
reads the workdir and takes no lock, and never destroys: it writes a temporary sibling of `--hf_dir`
and renames it into place when whole (a full disk leaves an earlier export as it was), and refuses an
`--hf_dir` that is the workdir, the directory the run was imported from, or a non-empty directory that
is not an earlier export of this run (`--overwrite` moves such a directory aside;
llm_jax/interop/hf_export.py). A mistake in the input is one line, `convert: error: ...` (`--debug`
shows the traceback; llm_jax/cli.py).
"""

from llm_jax import cli  # first: it sets host memory before numpy and JAX start threads (llm_jax/cli.py)

# isort: split
from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "Hugging Face model directory (read by from_hf, written by to_hf).")
flags.DEFINE_string("workdir", None, "llm_jax run directory (written by from_hf, read by to_hf and merge).")
flags.DEFINE_bool("scan_layers", False, "from_hf: store the layers stacked for nn.scan (model.scan_layers=True).")
flags.DEFINE_string("mesh", "1,-1,1", "from_hf: data,fsdp,tensor mesh sizes to place the weights on while converting.")
flags.DEFINE_integer("step", None, "to_hf: checkpoint step to export (default: the latest).")
flags.DEFINE_string("dtype", None, "to_hf: cast the weights to float32, bfloat16 or float16 (default: as trained).")
flags.DEFINE_bool(
    "overwrite", False, "to_hf: move a non-empty --hf_dir that is not an export of this run aside (never deleted)."
)
flags.DEFINE_bool("peft", False, "to_hf of a LoRA run: write PEFT's adapter format instead of the merged model.")
flags.DEFINE_string("out_workdir", None, "merge: the new (or empty) run directory to write.")
flags.mark_flags_as_required(["workdir"])

COMMANDS = ("from_hf", "to_hf", "merge")


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"give one command, {' or '.join(COMMANDS)}; got {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    need = "out_workdir" if argv[1] == "merge" else "hf_dir"
    if not FLAGS[need].value:
        raise app.UsageError(f"{argv[1]} needs --{need}")
    if FLAGS.peft and (argv[1] != "to_hf" or FLAGS.dtype):
        raise app.UsageError("--peft is an option of to_hf alone, without --dtype (adapters are written in float32)")
    from llm_jax.interop import hf, lora_export  # after flag parsing: jax starts with the platform flags in force
    from llm_jax.training import workdir as workdir_lib

    if argv[1] == "merge":
        lora_export.merge_run(FLAGS.workdir, FLAGS.out_workdir)
    elif argv[1] == "to_hf" and FLAGS.peft:
        lora_export.export_peft(FLAGS.workdir, FLAGS.hf_dir, step=FLAGS.step, overwrite=FLAGS.overwrite)
    elif argv[1] == "from_hf":
        try:
            data, fsdp, tensor = (int(s) for s in FLAGS.mesh.split(","))
        except ValueError:
            raise app.UsageError(f"--mesh={FLAGS.mesh!r}: give three integers data,fsdp,tensor, e.g. 1,-1,1") from None
        config = hf.run_config(FLAGS.hf_dir)
        config.model.scan_layers = FLAGS.scan_layers
        config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
        hint = ", or import into a new --workdir"
        lock = workdir_lib.claim(FLAGS.workdir, 0.0, print, "llm_jax.convert from_hf", hint)
        try:
            hf.import_run(FLAGS.hf_dir, FLAGS.workdir, config)
        finally:
            if lock is not None:
                lock.release()
    else:
        hf.export_run(FLAGS.workdir, FLAGS.hf_dir, step=FLAGS.step, dtype=FLAGS.dtype, overwrite=FLAGS.overwrite)


if __name__ == "__main__":
    cli.run(main, "convert")
