"""The `limajax` command line. Each command parses its options, builds a config and calls one
library function; user mistakes (UserError) become one line on stderr and exit code 2.

This module holds the group, the error rule and the options several commands share; the commands
live one capability per module (models, data, inference, train, evaluation), each importing
limajax's libraries only inside its command bodies so that `--help` stays fast."""

from __future__ import annotations

import functools
import glob
import os
import sys

import click

from limajax.errors import UserError

INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C


def interrupted(message: str):
    """What Ctrl-C says in this command instead of "nothing partial is left behind": what it
    kept and how to go on (read by Group)."""
    return lambda fn: setattr(fn, "interrupted", message) or fn


def options(*decorators):
    """Several click options as one decorator, listed by --help in this order."""
    return lambda fn: functools.reduce(lambda f, option: option(f), reversed(decorators), fn)


# --model MODEL_DIR, or --workdir W --epoch N (DESIGN §3: a training epoch serves wherever a model
# directory does).
model_source_options = options(
    click.option("--model", "model_dir", default=None, type=click.Path(path_type=str),
                 help="A model directory (from `limajax convert`)."),
    click.option("--workdir", default=None, type=click.Path(path_type=str),
                 help="A training workdir (with --epoch) instead of --model."),
    click.option("--epoch", type=click.IntRange(min=1), default=None,
                 help="With --workdir: the checkpoint that ends this epoch."))


def model_source(model_dir, workdir, epoch) -> tuple[str, int | None]:
    if (model_dir is None) == (workdir is None):
        raise UserError("give either --model MODEL_DIR or --workdir W --epoch N")
    if workdir is not None and epoch is None:
        raise UserError(f"--workdir {workdir} needs --epoch N (LIMA §3 picks one of epochs 5-10)")
    if model_dir is not None and epoch is not None:
        raise UserError("--epoch goes with --workdir, not --model")
    return (model_dir, None) if workdir is None else (workdir, epoch)


class Group(click.Group):
    """Where every command's mistakes end (DESIGN §3): a UserError or a bad, missing or unknown
    option is one line `error: ...`, exit code 2, without click's usage block (kept for --help
    and a missing or unknown command); Ctrl-C one line, exit code 130; anything else is a bug.
    Partial outputs (files.staged_dir / staged_file) are gone before the line is printed."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            if e.ctx is None or isinstance(e.ctx.command, click.Group):
                raise
            message = e.format_message()
        except UserError as e:
            message = str(e)
        except KeyboardInterrupt:
            command = self.commands.get(ctx.invoked_subcommand or "")
            click.echo("\n" + getattr(getattr(command, "callback", None), "interrupted",
                                      "interrupted; nothing partial is left behind"), err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            # Not sys.exit: interpreter shutdown would join Orbax's and TensorStore's worker
            # threads, which print their own tracebacks for the interrupted work.
            os._exit(INTERRUPTED)
        click.echo(f"error: {message}", err=True)
        sys.exit(2)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="limajax")
def main():
    """limajax: LIMA (Less Is More for Alignment) in JAX.

    Convert LLaMA weights (Meta or Hugging Face, in and out), prepare LIMA's dialogues,
    fine-tune with LIMA's recipe on a device mesh, plan its memory, score texts, sample,
    chat with and serve the model, and compare its answers with another model's.
    """
    cpu_unless_accelerator()


# Device nodes of the accelerators JAX can drive: TPU VMs (/dev/accel*, /dev/vfio/N on v5+),
# NVIDIA GPUs, AMD GPUs.
ACCELERATOR_NODES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def cpu_unless_accelerator() -> None:
    """On a machine with no accelerator, run on the CPU: with jax[tpu] or jax[cuda] installed
    JAX would otherwise try those backends at start-up (libtpu's warnings, CUDA's traceback,
    a delay). The user's own JAX_PLATFORMS is kept; `plan --target` asks for its compile-only
    devices explicitly, which this does not stop."""
    if "JAX_PLATFORMS" not in os.environ and not any(
            glob.glob(pattern) for pattern in ACCELERATOR_NODES):
        os.environ["JAX_PLATFORMS"] = "cpu"


# --- options several commands share ----------------------------------------------------------


progress_option = click.option("--progress/--no-progress", default=True, show_default=True,
                               help="Show a progress bar.")


def mesh_option(default: str | None = "1x1"):
    recipe = " (default: the recipe's)" if default is None else ""
    return click.option("--mesh", default=default, show_default=default is not None,
                        help=f"DATAxMODEL device mesh{recipe}.")


def start_devices(mesh: str) -> None:
    """sharding.start before any other library module is imported, so that none can reach JAX's
    devices before the mesh's are ready (on a CPU host they are simulated, DESIGN §4)."""
    from limajax import sharding

    sharding.start(mesh)


# The knobs of LIMA §4.1's sampler, shared by sample, chat and select.
sampling_options = options(
    click.option("--temperature", type=float, default=None,
                 help="Softmax temperature; 0 means greedy. Default: LIMA §4.1's 0.7."),
    click.option("--top-p", type=float, default=None,
                 help="Nucleus sampling: keep the most probable tokens up to this mass. "
                 "Default: LIMA §4.1's 0.9."),
    click.option("--repetition-penalty", type=float, default=None,
                 help="CTRL's penalty on every token already in the context, prompt "
                 "included (LIMA §4.1: 1.2). Default: 1.2, or 1.0 with --greedy."),
    click.option("--repetition-penalty-scope", type=click.Choice(["context", "generated"]),
                 default="context", show_default=True, expose_value=False,
                 callback=lambda ctx, _, v: ctx.meta.__setitem__("penalty_scope", v),
                 help="Which ids the penalty counts: the whole context, prompt included "
                 "(transformers' processor; limajax's default), or only the answer's "
                 "(LIMA §4.1's wording: 'previously generated tokens')."),
    click.option("--max-new-tokens", type=click.IntRange(min=1), default=2048,
                 show_default=True,
                 help="Stop an answer after this many tokens (never past 2048 in all)."),
    click.option("--greedy", is_flag=True,
                 help="Take the most probable token (no temperature or top-p)."),
    click.option("--seed", type=int, default=0, show_default=True,
                 help="Draws depend only on (seed, prompt id, sample index)."),
    mesh_option())


def sampling_settings():
    """The running command's sampling_options as the sampler's Settings, which resolves None to
    LIMA §4.1's values. Called after start_devices where a command starts devices: it imports the
    sampler."""
    from limajax.sampling import Settings

    ctx = click.get_current_context()
    return Settings(**{k: ctx.params[k] for k in ("temperature", "top_p", "repetition_penalty",
                                                  "max_new_tokens", "greedy", "seed")},
                    penalty_scope=ctx.meta["penalty_scope"])


def client_options(role: str):
    """The options of limajax's one endpoint client (limajax/endpoint.py), for judges and
    for `sample --endpoint` alike."""
    return [
        click.option("--api-key-env", default=None, metavar="VAR",
                     help=f"Environment variable holding the {role}'s API key (read from there "
                     "only; never written anywhere). Default: send no key."),
        click.option("--concurrency", default=8, show_default=True, type=click.IntRange(min=1),
                     help="Requests in flight at once."),
        click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(min=0.1),
                     help="Seconds to wait for one answer before retrying."),
        click.option("--max-retries", default=6, show_default=True, type=click.IntRange(min=0),
                     help="Retries per request on 429 (honouring Retry-After), 5xx, dropped "
                     "connections and time-outs, with exponential backoff."),
    ]


@main.command()
@click.option("--workdir", default="runs/demo", show_default=True,
              type=click.Path(path_type=str), help="Where every step writes its output.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Fine-tuning epochs (default: configs/tiny.py's).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing --workdir that an earlier demo made (nothing else).")
def demo(workdir, epochs, overwrite):
    """The whole pipeline on a tiny model and the embedded sample data, on a laptop CPU.

    A tokenizer, a random tiny LLaMA as a Hugging Face checkpoint, convert, export, data
    prepare, fine-tune with LIMA's recipe on a simulated 2x4 mesh, score before and after; then
    LIMA §4: sample the held-out prompts from the base and the fine-tuned model, compare them
    with a judge in both orders (an external one if LIMAJAX_JUDGE_URL is set, else limajax's
    own serve of the tiny model, whose verdicts are noise), report, chart and annotation sheet.

    Example: limajax demo --workdir runs/demo
    """
    from limajax.sample_data import tiny  # the demo's recipe; it imports only limajax.config

    start_devices(tiny.config.mesh)
    from limajax.demo import run_demo

    run_demo(workdir, epochs=epochs, overwrite=overwrite)


# The commands register themselves on `main` when their modules are imported: last, because
# they import the names above.
from limajax.cli import data, evaluation, inference, models, train  # noqa: E402, F401
