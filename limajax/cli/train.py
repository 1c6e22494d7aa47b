"""`limajax train` / `plan`: LIMA's fine-tuning recipe on a mesh, and its memory."""

import sys

import click

from limajax import cli
from limajax.errors import UserError

DOES_NOT_FIT = 3  # `plan`'s answer "no", apart from 1 (a bug) and 2 (a user's mistake)


@cli.main.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=str),
              help="A recipe file from configs/ (defines `config = TrainConfig(...)`).")
@cli.mesh_option(None)
@click.option("--init", default=None, type=click.Path(path_type=str),
              help="Start from this model directory (from `limajax convert`).")
@click.option("--data", "data_dir", default=None, type=click.Path(path_type=str),
              help="A dataset from `limajax data prepare` (default: the embedded sample data).")
@click.option("--workdir", required=True, type=click.Path(path_type=str),
              help="Run directory: config.json, metrics.jsonl, checkpoints/, TensorBoard events. "
              "Rerunning with the same workdir resumes from its latest checkpoint.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set optim.lr=2e-5 (repeatable).")
@click.option("--tokenizer", default=None, type=click.Path(path_type=str),
              help="tokenizer.model or tokenizer.json for a randomly initialised model "
              "(no --init).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs to train (default: the recipe's; LIMA §3: 15).")
@click.option("--save-every-steps", type=click.IntRange(min=1), default=None,
              help="Also checkpoint every N steps (one checkpoint per epoch always).")
@click.option("--peak-flops", type=float, default=None,
              help="The mesh's peak FLOP/s for MFU (default: known accelerator peaks; on CPU "
              "a measured matmul rate).")
@click.option("--coordinator", default=None, metavar="HOST:PORT",
              help="Multi-host: the address of process 0.")
@click.option("--num-processes", type=click.IntRange(min=1), default=None,
              help="Multi-host: how many processes share the mesh (with --coordinator).")
@click.option("--process-id", type=click.IntRange(min=0), default=None,
              help="Multi-host: this process's index, 0 to --num-processes - 1.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show progress per epoch (a bar on a terminal, a line per quarter in a log).")
@cli.interrupted("interrupted; rerun the same command to resume from the last checkpoint (one "
                 "is saved at every epoch's end)")
def train(config_path, mesh, init, data_dir, workdir, overrides, tokenizer, epochs,
          save_every_steps, peak_flops, coordinator, num_processes, process_id, progress):
    """Fine-tune with LIMA's recipe (LIMA §3): 15 epochs, AdamW, lr 1e-5 -> 1e-6, depth-wise
    residual dropout, a checkpoint after every epoch.

    Example: limajax train --config configs/lima_65b.py --init models/llama1-65b
    --data data/lima --workdir runs/lima-65b
    """

    from limajax import sharding
    from limajax.config import load_recipe

    config = load_recipe(config_path, overrides, mesh=mesh, init=init, tokenizer=tokenizer,
                         epochs=epochs, save_every_steps=save_every_steps,
                         data={"path": data_dir})
    from limajax import targets

    targets.share_gpu_memory()  # before JAX starts
    sharding.start(config.mesh, coordinator, num_processes, process_id)
    from limajax import plan as plan_lib
    from limajax import train as train_lib

    if config.model.remat == "auto":
        config, line = plan_lib.resolve_remat(config, sharding.make_mesh(config.mesh))
        click.echo(line, err=True)

    try:
        train_lib.train_recipe(config, workdir, peak=peak_flops, progress=progress)
    except train_lib.Diverged as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


@cli.main.command()
@click.option("--config", "config_path", default=None, type=click.Path(path_type=str),
              help="A recipe file from configs/ (required unless --list-targets).")
@cli.mesh_option(None)
@click.option("--target", default=None,
              help="Compile for this accelerator slice with its own compiler, e.g. v5p-16 or "
              "h200x8 (see --list-targets); default: the CPU compiler as a stand-in.")
@click.option("--list-targets", is_flag=True,
              help="List the targets, their devices and memory per device, and exit.")
@click.option("--device-memory", default=None,
              help="Memory per device, e.g. 32GiB, 16GB, 80GiB (default: the target's usable "
              "memory; 32GiB without --target).")
@click.option("--seq-len", type=click.IntRange(min=1), default=None,
              help="Sequence length to plan for (default: the recipe's max_len).")
@click.option("--sample", "sample_shape", default=None, metavar="BATCHxCONTEXT",
              help="Plan the sampler instead (sample, serve): prefill and one decode step of "
              "BATCH rows of CONTEXT tokens with their KV cache, e.g. 8x2048.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set model.remat=dots (repeatable).")
def plan(config_path, mesh, target, list_targets, device_memory, seq_len, sample_shape,
         overrides):
    """Compile the real train step ahead of time and print its memory per device (parameters,
    optimiser state, compiler temporaries) against the device's, beside an analytic estimate.
    Exit code 3 if it does not fit. With --target, the accelerator's own compiler does it on
    compile-only devices (pip install "limajax[tpu]" or "limajax[cuda-plan]"), with its cost model's
    step-time estimates where it has one.

    Example: limajax plan --config configs/lima_65b_h200.py --target h200x8

    With --sample, the same for the sampler on the recipe's model: parameters, KV cache and
    the compiler's temporaries of the prefill and of a decode step, with the cost model's
    prefill time and decode tokens/s where it has one.
    """
    from limajax import targets

    if list_targets:
        click.echo(targets.listing())
        return
    if config_path is None:
        raise UserError("plan needs --config RECIPE (or --list-targets)")
    from limajax import plan as plan_lib
    from limajax import sharding
    from limajax.config import load_recipe

    if sample_shape is not None and seq_len is not None:
        raise UserError("--seq-len is the train step's; with --sample the context is "
                        "BATCHxCONTEXT's")
    sample = None if sample_shape is None else plan_lib.parse_sample(sample_shape)
    chosen = None if target is None else targets.find(target)
    config = load_recipe(config_path, overrides, mesh=mesh)
    if chosen is None:  # a target's compile-only devices are plan's (plan.placed)
        sharding.start(config.mesh)
    memory = None if device_memory is None else plan_lib.parse_bytes(device_memory)
    if chosen is None and memory is None:
        memory = plan_lib.parse_bytes("32GiB")
    if sample is not None:
        report = plan_lib.plan_sample(config, *sample, memory, target=chosen)
    else:
        report = plan_lib.plan(config, memory, seq_len=seq_len, target=chosen)
    for line in report.notices:
        click.echo(line, err=True)
    click.echo(report.format())
    if not report.fits:
        sys.exit(DOES_NOT_FIT)
