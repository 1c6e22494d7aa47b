"""The `limajax` command line. Each command parses its options, builds a config and calls one
library function; user mistakes (UserError) become one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import glob
import os
import sys

import click

from limajax.errors import UserError

DOES_NOT_FIT = 3  # `plan`'s answer "no", apart from 1 (a bug) and 2 (a user's mistake)


INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C


def user_errors(fn=None, *, interrupted: str = "interrupted; nothing partial is left behind"):
    """Turn a UserError into `error: ...` and exit code 2 (DESIGN §3), and Ctrl-C into one line
    and exit code 130; anything else is a bug. Partial outputs are removed on the way out
    (files.staged_dir / staged_file), before the line is printed."""
    if fn is None:
        return functools.partial(user_errors, interrupted=interrupted)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo(f"\n{interrupted}", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            # Not sys.exit: interpreter shutdown would join Orbax's and TensorStore's worker
            # threads, which print their own tracebacks for the interrupted work.
            os._exit(INTERRUPTED)

    return wrapper


def model_source_options(fn):
    """--model MODEL_DIR, or --workdir W --epoch N (DESIGN §3: a training epoch serves wherever a
    model directory does)."""
    fn = click.option("--epoch", type=click.IntRange(min=1), default=None,
                      help="With --workdir: the checkpoint that ends this epoch.")(fn)
    fn = click.option("--workdir", default=None, type=click.Path(path_type=str),
                      help="A training workdir (with --epoch) instead of --model.")(fn)
    return click.option("--model", "model_dir", default=None, type=click.Path(path_type=str),
                        help="A model directory (from `limajax convert`).")(fn)


def model_source(model_dir, workdir, epoch) -> tuple[str, int | None]:
    if (model_dir is None) == (workdir is None):
        raise UserError("give either --model MODEL_DIR or --workdir W --epoch N")
    if workdir is not None and epoch is None:
        raise UserError(f"--workdir {workdir} needs --epoch N (LIMA §3 picks one of epochs 5-10)")
    if model_dir is not None and epoch is not None:
        raise UserError("--epoch goes with --workdir, not --model")
    return (model_dir, None) if workdir is None else (workdir, epoch)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


# --- commands are added below, one section per capability -------------------------------------


# --- convert / export: Meta and Hugging Face checkpoints <-> model directories (limajax.convert)


@main.command()
@click.option("--from", "source", required=True, type=click.Choice(["meta", "hf"]),
              help="meta: params.json + consolidated.NN.pth; hf: config.json + safetensors.")
@click.option("--input", "input_dir", required=True, type=click.Path(path_type=str),
              help="The checkpoint directory.")
@click.option("--tokenizer", type=click.Path(path_type=str), default=None,
              help="(meta) tokenizer.model or tokenizer.json; default: the one in --input or "
              "beside it.")
@click.option("--output", required=True, type=click.Path(path_type=str),
              help="New model directory (built beside it, renamed when complete).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True, help="Parameter dtype in the model directory.")
@click.option("--add-eot/--no-add-eot", default=True, show_default=True,
              help="Add LIMA's end-of-turn token (id = the base vocabulary size; its rows start "
              "as the mean of the others).")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None,
              help="Context length (default: config.json's; for Meta, the family's: LLaMA-1 "
              "2048, Llama-2 4096, Llama-3 8192, Llama-3.1 131072).")
@click.option("--no-tokenizer", is_flag=True,
              help="Convert without a tokenizer.model (score and train --init refuse such a "
              "model; export works).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing --output that an earlier convert made (nothing else).")
@user_errors
def convert(source, input_dir, tokenizer, output, dtype, add_eot, max_seq_len, no_tokenizer,
            overwrite):
    """LLaMA weights -> a limajax model directory (params/, model.json, tokens.json, tokenizer).

    Tensors are streamed one at a time, so memory stays near one merged tensor; disk needs
    about twice the converted model while it runs.

    Example: limajax convert --from meta --input llama/7B --output models/llama1-7b
    """
    from limajax import convert as convert_lib

    config, tokens, found = convert_lib.convert(source, input_dir, output, tokenizer=tokenizer,
                                                dtype=dtype, add_eot=add_eot,
                                                overwrite=overwrite, max_seq_len=max_seq_len,
                                                no_tokenizer=no_tokenizer)
    if found is None:
        click.echo(f"notice: --no-tokenizer: the model directory has no tokenizer; BOS "
                   f"{tokens.bos_id} and EOS {tokens.eos_id} are assumed", err=True)
    guess = convert_lib.context_guess(input_dir, max_seq_len) if source == "meta" else None
    if guess is not None:
        click.echo(f"notice: context {config.max_seq_len:,} is the {guess[0]} family's (Meta's "
                   "params.json does not state it); pass --max-seq-len N if the model was "
                   "trained at another length", err=True)
    eot = f", EOT {tokens.eot_id}" if tokens.eot_id is not None else ", no EOT"
    click.echo(f"wrote {output}: {config.n_params / 1e6:,.1f}M parameters ({dtype}), "
               f"{config.n_layers} layers, vocabulary {tokens.vocab_size}{eot} "
               f"(padded to {tokens.padded_vocab_size}), context {config.max_seq_len:,}")


@main.command()
@click.option("--to", "target", required=True, type=click.Choice(["hf", "meta"]),
              help="hf: safetensors + config.json + tokenizer for transformers; meta: params.json "
              "+ consolidated.NN.pth.")
@model_source_options
@click.option("--output", required=True, type=click.Path(path_type=str),
              help="New checkpoint directory (built beside it, renamed when complete).")
@click.option("--shards", default=1, show_default=True, type=click.IntRange(min=1),
              help="(meta) model-parallel shards to split the tensors into.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing --output that an earlier export --to the same format made "
              "(nothing else).")
@user_errors
def export(target, model_dir, workdir, epoch, output, shards, overwrite):
    """A model directory, or a training epoch, -> a Hugging Face or Meta checkpoint
    (vocabulary padding dropped).

    Examples: limajax export --to hf --model models/llama1-7b --output hf/llama1-7b;
    limajax export --to hf --workdir runs/lima-65b --epoch 7 --output hf/lima-65b-e7
    """
    from limajax import convert as convert_lib

    source, epoch = model_source(model_dir, workdir, epoch)
    convert_lib.export(target, source, output, shards=shards, overwrite=overwrite, epoch=epoch)
    click.echo(f"wrote {output}")


# --- data: GAIR JSONL -> TFDS dataset, and what is in it (limajax.data) -------------------------


@main.group()
def data():
    """Prepare LIMA's dialogues (GAIR's JSONL) as a TFDS dataset, and inspect one."""


@data.command("prepare")
@click.option("--input", "input_dir", type=click.Path(path_type=str), default=None,
              help="Directory with train.jsonl (+ optional test.jsonl, dev.jsonl; .json too), "
              "or one training file (e.g. alpaca_data.json). Default: the sample dialogues "
              "shipped with limajax.")
@click.option("--format", "fmt", type=click.Choice(["gair", "alpaca", "sharegpt", "openai"]),
              default=None,
              help="Insist on this input format; default: detected (each file keeps to one).")
@click.option("--template", type=click.Choice(["lima", "alpaca"]), default="lima",
              show_default=True,
              help="User turns as they are (LIMA's dialogue format) or in Stanford Alpaca's "
              "prompt; sample the model with the same --template.")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=str),
              help="New directory for the dataset (written whole or not at all).")
@click.option("--dev-from-train", type=click.IntRange(min=0), default=0, show_default=True,
              help="Hold out N seeded training dialogues as the dev split.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for --dev-from-train and --sample.")
@click.option("--sample", type=click.IntRange(min=1), default=None,
              help="Keep a seeded sample of N training dialogues (LIMA §5 quantity ablation).")
@click.option("--sources", default=None,
              help="Comma-separated sources to train on, e.g. stackexchange,wikihow "
              "(LIMA §5 diversity ablation); -NAME leaves NAME out: --sources=-multi_turn "
              "trains without LIMA §6's 30 multi-turn dialogues.")
@user_errors
def data_prepare(input_dir, fmt, template, output_dir, dev_from_train, seed, sample, sources):
    """Check the input files (GAIR, Alpaca, ShareGPT or OpenAI messages) and write them as a
    versioned ArrayRecord dataset of GAIR rows."""
    from limajax import data as data_lib

    options = data_lib.PrepareOptions(
        dev_from_train=dev_from_train, seed=seed, sample=sample,
        sources=tuple(s.strip() for s in sources.split(",") if s.strip()) if sources else None,
        format=fmt, template=template,
    )
    metadata = data_lib.prepare(input_dir or data_lib.SAMPLE_DATA, output_dir, options)
    click.echo(f"prepared {data_lib.dataset_dir(output_dir)}")
    click.echo("  " + ", ".join(f"{k}: {v:,}" for k, v in metadata["examples"].items()))
    for name, info in metadata["inputs"].items():
        click.echo(f"  {name}: {info['rows']:,} {info['format']} rows, sha256 {info['sha256']}")
    [train] = [i for i in metadata["inputs"].values() if i["split"] == "train"]
    if train["trailing_user_turns_dropped"] or train["rows_without_answer"]:
        click.echo(f"  dropped {train['trailing_user_turns_dropped']:,} unanswered last user "
                   f"turns; skipped {train['rows_without_answer']:,} rows left without a turn")
    if train["multi_turn_sources_inferred"]:
        click.echo(f"  {train['multi_turn_sources_inferred']:,} dialogues of more than one "
                   f"exchange without a source: source {data_lib.MULTI_TURN!r} (GAIR's name for "
                   "LIMA §6's dialogues)")


@data.command("inspect")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=str),
              help="A directory written by `limajax data prepare`.")
@click.option("--tokenizer", "tokenizer_path", required=True, type=click.Path(path_type=str),
              help="A model directory, or a bare tokenizer.model or tokenizer.json (with LIMA's "
              "EOT).")
@click.option("--max-len", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Trim length (LIMA §3: 2048).")
@click.option("--train-on-prompts", is_flag=True,
              help="Count loss on user turns too (default: assistant turns and their EOT).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Write a histogram of lengths to this PNG instead of the text one.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Dialogues per step, for the rows and padding of an epoch packed and not.")
@user_errors
def data_inspect(data_dir, tokenizer_path, max_len, train_on_prompts, plot, batch_size):
    """Examples per split and source, turns, token lengths, trimming and loss coverage."""
    from limajax import data as data_lib
    from limajax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(tokenizer_path)
    stats = data_lib.inspect(data_dir, tokenizer, max_len=max_len,
                             train_on_prompts=train_on_prompts, batch_size=batch_size)
    click.echo(data_lib.format_stats(stats, histogram=plot is None))
    if plot:
        data_lib.plot_lengths(stats, plot)
        click.echo(f"wrote {plot}")


# --- score ---------------------------------------------------------------------------------------


@main.command()
@model_source_options
@click.option("--input", "input_path", required=True, type=click.Path(path_type=str),
              help='JSONL rows {"id", "text"}; BOS is prepended, no chat format.')
@click.option("--output", "output_path", required=True, type=click.Path(path_type=str),
              help='JSONL rows adding "token_ids", "logprobs", "nll", "ppl" and "trimmed" '
              "(missing directories are created).")
@click.option("--mesh", default="1x1", show_default=True, help="DATAxMODEL device mesh.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Texts per forward pass (rounded up to a multiple of the mesh's data axis).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
@user_errors
def score(model_dir, workdir, epoch, input_path, output_path, mesh, batch_size, overwrite):
    """Log-probability of every token of each text, and its perplexity (LIMA App. B).

    Example: limajax score --model runs/tiny-model --input texts.jsonl --output scores.jsonl
    """
    from limajax import sharding

    sharding.start(mesh)  # before anything touches the devices
    from limajax.perplexity import score_file

    source, epoch = model_source(model_dir, workdir, epoch)
    summary = score_file(source, input_path, output_path, mesh, batch_size, epoch=epoch,
                         overwrite=overwrite)
    if summary["trimmed"]:
        click.echo(f"notice: {summary['trimmed']} of {summary['rows']} texts are longer than the "
                   f"model's context ({summary['max_len']:,} tokens): scored on their first "
                   f"{summary['max_len']:,} tokens", err=True)
    click.echo(f"scored {summary['rows']} texts, {summary['tokens']} tokens: "
               f"nll {summary['nll']:.4f}, perplexity {summary['ppl']:.3f} -> {output_path}")


# --- sample: LIMA's generation settings over prompt files (limajax.sampling) --------------------


progress_option = click.option("--progress/--no-progress", default=True, show_default=True,
                               help="Show a progress bar.")


def sampling_options(fn):
    """The knobs of LIMA §4.1's sampler, shared by sample and chat."""
    for decorator in reversed([
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
        click.option("--mesh", default="1x1", show_default=True, help="DATAxMODEL device mesh."),
    ]):
        fn = decorator(fn)
    return fn


def sampling_settings(temperature, top_p, repetition_penalty, max_new_tokens, greedy, seed):
    from limajax.sampling import Settings  # resolves None to LIMA §4.1's values

    return Settings(temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                    max_new_tokens=max_new_tokens, greedy=greedy, seed=seed,
                    penalty_scope=click.get_current_context().meta["penalty_scope"])


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


def endpoint_options(fn):
    """`sample --endpoint`: answers from a model behind an OpenAI-compatible API."""
    for decorator in reversed([
        click.option("--endpoint", "endpoint_url", default=None, metavar="URL",
                     help="Answer through an OpenAI-compatible API instead of a local model "
                     "(its base URL, e.g. https://api.openai.com/v1 or a vLLM or limajax "
                     "serve at http://127.0.0.1:8000/v1); with --prompts and --output."),
        click.option("--endpoint-model", default=None, metavar="NAME",
                     help="With --endpoint: the model to ask, as its /models lists it."),
        *client_options("endpoint"),
        click.option("--retry-failed", is_flag=True,
                     help="With --endpoint: ask again the prompts an earlier run recorded as "
                     "refused (failed rows); by default a rerun asks only for missing rows."),
    ]):
        fn = decorator(fn)
    return fn


@main.command()
@model_source_options
@click.option("--prompts", "prompts_path", type=click.Path(path_type=str), default=None,
              help='Prompts as GAIR rows {"id", "conversations": [...]}, or any format '
              "`data prepare` reads (Alpaca, ShareGPT, OpenAI messages; JSONL or a JSON array).")
@click.option("--output", "output_path", type=click.Path(path_type=str), default=None,
              help="JSONL answers (with --prompts); rows already there are skipped.")
@click.option("--prompt", "text", default=None, help="Answer this one prompt and print it.")
@sampling_options
@click.option("--num-samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Answers per prompt (LIMA §5 samples 5).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Answers generated together (prompts of similar length are batched).")
@click.option("--raw", is_flag=True,
              help="Continue the first conversation entry as plain text after BOS (base models; "
              "with --endpoint: /completions); default: LIMA's dialogue format, every "
              "utterance ending in EOT (with --endpoint: /chat/completions, turns as messages).")
@click.option("--template", type=click.Choice(["lima", "alpaca"]), default="lima",
              show_default=True,
              help="User turns as they are, or in Stanford Alpaca's prompt: the --template the "
              "model was trained with (data prepare --template).")
@endpoint_options
@progress_option
@user_errors(interrupted="interrupted: the answers finished so far are in --output; the same "
             "command continues from there")
def sample(model_dir, workdir, epoch, prompts_path, output_path, text, temperature, top_p,
           repetition_penalty, max_new_tokens, greedy, seed, mesh, num_samples, batch_size,
           raw, template, endpoint_url, endpoint_model, api_key_env, concurrency, timeout,
           max_retries, retry_failed, progress):
    """Answer prompts with LIMA's sampler (LIMA §4.1: nucleus 0.9, temperature 0.7,
    repetition penalty 1.2, up to 2048 tokens, stop at EOT), batched and KV-cached; or, with
    --endpoint, ask a model behind an OpenAI-compatible API (a baseline of LIMA's Figure 1).

    Examples: limajax sample --workdir runs/lima-65b --epoch 7 --prompts test.jsonl
    --output answers.jsonl;  limajax sample --model models/x --prompt "Tell me a joke.";
    limajax sample --endpoint https://api.openai.com/v1 --endpoint-model gpt-4
    --api-key-env OPENAI_API_KEY --prompts test.jsonl --output gpt4.jsonl
    """
    if (prompts_path is None) == (text is None):
        raise UserError("give either --prompts FILE.jsonl --output OUT.jsonl or --prompt TEXT")
    if prompts_path is not None and output_path is None:
        raise UserError("--prompts needs --output OUT.jsonl")
    if endpoint_url is not None or endpoint_model is not None:
        return sample_endpoint(
            model_dir, workdir, prompts_path, output_path, text, temperature, top_p,
            repetition_penalty, max_new_tokens, greedy, seed, num_samples, raw, template,
            endpoint_url, endpoint_model, api_key_env, concurrency, timeout, max_retries,
            retry_failed, progress)
    if retry_failed:
        raise UserError("--retry-failed goes with --endpoint (local sampling never refuses)")
    settings = sampling_settings(temperature, top_p, repetition_penalty, max_new_tokens, greedy,
                                 seed)
    source, epoch = model_source(model_dir, workdir, epoch)
    from limajax import sharding

    sharding.start(mesh)  # before anything touches the devices
    from limajax import sampling

    if text is not None:
        from limajax.formats import templated

        text = templated([text], template)[0]
        answers = sampling.sample_text(source, text, settings, epoch=epoch,
                                       num_samples=num_samples, mesh_spec=mesh, raw=raw)
        for k, answer in enumerate(answers):
            if num_samples > 1:
                click.echo(f"--- sample {k}")
            click.echo(answer)
        return
    summary = sampling.sample_file(source, prompts_path, output_path, settings, epoch=epoch,
                                   num_samples=num_samples, batch_size=batch_size,
                                   mesh_spec=mesh, raw=raw, template=template,
                                   progress=progress)
    click.echo(f"wrote {summary['answers']} answers ({summary['tokens']} tokens, "
               f"{summary['tokens'] / max(summary['seconds'], 1e-9):.1f} tokens/s) to "
               f"{output_path}; {summary['skipped']} were already there")


def sample_endpoint(model_dir, workdir, prompts_path, output_path, text, temperature, top_p,
                    repetition_penalty, max_new_tokens, greedy, seed, num_samples, raw, template,
                    endpoint_url, endpoint_model, api_key_env, concurrency, timeout,
                    max_retries, retry_failed, progress):
    """`sample --endpoint URL --endpoint-model NAME --prompts ... --output ...`."""
    if endpoint_url is None or endpoint_model is None:
        raise UserError("give --endpoint URL and --endpoint-model NAME together")
    if model_dir is not None or workdir is not None:
        raise UserError("--endpoint answers instead of a local model: give no --model / "
                        "--workdir")
    if text is not None:
        raise UserError("--endpoint takes --prompts FILE.jsonl --output OUT.jsonl, not --prompt")
    from limajax.endpoint import Endpoint
    from limajax.sampling.endpoint import answer_file, sent_settings

    settings = sampling_settings(temperature, top_p, repetition_penalty, max_new_tokens, greedy,
                                 seed)
    ep = Endpoint(endpoint_url, endpoint_model, api_key_env=api_key_env, timeout=timeout,
                  max_retries=max_retries, concurrency=concurrency)
    s = answer_file(ep, prompts_path, output_path, sent_settings(settings, repetition_penalty),
                    num_samples=num_samples, raw=raw, retry_failed=retry_failed,
                    template=template, progress=progress)
    click.echo(f"wrote {s['answers']} answers from {endpoint_model} ({s['tokens']} tokens, "
               f"{s['retries']} retries) to {output_path}; {s['skipped']} were already there; "
               f"{s['failed']} refused now, {s['failed_total']} failed rows in the file")
    if s["failed_total"]:
        click.echo(f"notice: {s['failed_total']} prompts were refused by the endpoint (failed "
                   "rows with the reason; compare, annotate and rate leave them out); rerun "
                   "with --retry-failed to ask again", err=True)


# --- chat: a conversation in the terminal (limajax.chat) ------------------------------------------


@main.command()
@model_source_options
@sampling_options
@click.option("--record", "record_path", default=None,
              type=click.Path(dir_okay=False, path_type=str),
              help="Append each finished conversation (at /reset and at the end) to this JSONL "
              "file as a GAIR row with the settings and checkpoint, for `rate --per-turn` "
              "(LIMA §6).")
@user_errors
def chat(model_dir, workdir, epoch, temperature, top_p, repetition_penalty, max_new_tokens,
         greedy, seed, mesh, record_path):
    """Talk with the model in LIMA's dialogue format, the answer streaming in as it is made.

    /reset forgets the conversation, /settings shows (and `/settings temperature=0.5` changes)
    the sampling settings, /exit or Ctrl-D quits, Ctrl-C stops an answer. When the history
    outgrows the context, the oldest turns are dropped (and it says so).

    Example: limajax chat --workdir runs/lima-65b --epoch 7 [--record conversations.jsonl]
    """
    settings = sampling_settings(temperature, top_p, repetition_penalty, max_new_tokens, greedy,
                                 seed)
    source, epoch = model_source(model_dir, workdir, epoch)
    from limajax import sharding

    sharding.start(mesh)  # before anything touches the devices
    from limajax.chat import chat as chat_lib

    chat_lib(source, settings, epoch=epoch, mesh_spec=mesh, record_path=record_path)


# --- serve: an OpenAI-compatible HTTP server with continuous batching (limajax.serving) -----------


@main.command()
@model_source_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback: only this machine can connect).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port to listen on.")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(min=1),
              help="Decode slots: answers generated at once (continuous batching).")
@click.option("--context", type=click.IntRange(min=2), default=None,
              help="Tokens per slot, prompt and answer together (default and most: 2048, or "
              "the model's context if shorter).")
@click.option("--mesh", default="1x1", show_default=True, help="DATAxMODEL device mesh.")
@click.option("--name", default=None, help="The model id in /v1/models (default: the path).")
@click.option("--api-key-env", default=None, metavar="VAR",
              help="Require 'Authorization: Bearer KEY' with KEY read from the environment "
              "variable VAR (never from the command line; never logged).")
@click.option("--no-auth", is_flag=True,
              help="Serve a non-loopback --host without a key (refused otherwise).")
@user_errors
def serve(model_dir, workdir, epoch, host, port, max_batch, context, mesh, name, api_key_env,
          no_auth):
    """Serve the model over an OpenAI-compatible HTTP API: /v1/chat/completions (LIMA's
    dialogue format), /v1/completions (plain continuation), /v1/models, /health; streaming,
    n, stop, seed and a `repetition_penalty` extension; omitted settings are LIMA §4.1's.

    Example: limajax serve --workdir runs/lima-65b --epoch 7 --port 8000
    """
    source, epoch = model_source(model_dir, workdir, epoch)
    from limajax import sharding

    sharding.start(mesh)  # before anything touches the devices
    from limajax.serving import serve as serve_lib

    serve_lib(source, epoch=epoch, host=host, port=port, max_batch=max_batch, mesh_spec=mesh,
              context=context, name=name, api_key_env=api_key_env, no_auth=no_auth)


# --- train / plan: LIMA's fine-tuning recipe on a mesh (limajax.train) --------------------------


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=str),
              help="A recipe file from configs/ (defines `config = TrainConfig(...)`).")
@click.option("--mesh", default=None, help="DATAxMODEL device mesh (default: the recipe's).")
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
              help="Show a progress bar per epoch (on a terminal; a log gets the epoch lines).")
@user_errors(interrupted="interrupted; rerun the same command to resume from the last "
             "checkpoint (one is saved at every epoch's end)")
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

    # The share of each GPU's memory JAX may take, as `plan --target` plans against (JAX's
    # default is 0.75); it must be set before JAX starts and changes nothing off a GPU.
    fraction = os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                     str(targets.GPU_MEMORY_FRACTION))
    sharding.start(config.mesh, coordinator, num_processes, process_id)
    import jax

    from limajax import plan as plan_lib
    from limajax import train as train_lib

    if jax.default_backend() == "gpu":
        click.echo(f"notice: JAX may use {float(fraction):.0%} of each GPU's memory "
                   f"(XLA_PYTHON_CLIENT_MEM_FRACTION={fraction}; `limajax plan --target` plans "
                   f"against {targets.GPU_MEMORY_FRACTION:.0%})", err=True)
    if config.model.remat == "auto":
        config, line = plan_lib.resolve_remat(config, sharding.make_mesh(config.mesh))
        click.echo(line, err=True)

    try:
        train_lib.train_recipe(config, workdir, peak=peak_flops, progress=progress)
    except train_lib.Diverged as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


@main.command()
@click.option("--config", "config_path", default=None, type=click.Path(path_type=str),
              help="A recipe file from configs/ (required unless --list-targets).")
@click.option("--mesh", default=None, help="DATAxMODEL device mesh (default: the recipe's).")
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
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set model.remat=dots (repeatable).")
@user_errors
def plan(config_path, mesh, target, list_targets, device_memory, seq_len, overrides):
    """Compile the real train step ahead of time and print its memory per device (parameters,
    optimiser state, compiler temporaries) against the device's, beside an analytic estimate.
    Exit code 3 if it does not fit. With --target, the accelerator's own compiler does it on
    compile-only devices (pip install "limajax[tpu]" or "limajax[cuda]"), with its cost model's
    step-time estimates where it has one.

    Example: limajax plan --config configs/lima_65b_h200.py --target h200x8
    """
    from limajax import targets

    if list_targets:
        click.echo(targets.listing())
        return
    if config_path is None:
        raise UserError("plan needs --config RECIPE (or --list-targets)")
    from limajax import sharding
    from limajax.config import load_recipe

    chosen = None if target is None else targets.find(target)
    config = load_recipe(config_path, overrides, mesh=mesh)
    if chosen is None:
        sharding.start(config.mesh)
        devices = None
    else:
        targets.check_mesh(chosen, config.mesh, sharding.mesh_devices(config.mesh))
        devices = targets.compile_only_devices(chosen)
    from limajax import attention
    from limajax import plan as plan_lib

    memory = None if device_memory is None else plan_lib.parse_bytes(device_memory)
    if chosen is None and memory is None:
        memory = plan_lib.parse_bytes("32GiB")
    mesh = sharding.make_mesh(config.mesh, devices)
    m = config.model
    for line in sharding.replication_notices(m, mesh):
        click.echo(line, err=True)
    click.echo(attention.describe(m.attention, mesh.devices.flat[0].platform,
                                  (m.n_heads, m.n_kv_heads, mesh.shape["model"])), err=True)
    report = plan_lib.plan(config, memory, seq_len=seq_len, mesh=mesh, target=chosen)
    click.echo(report.format())
    if not report.fits:
        sys.exit(DOES_NOT_FIT)


# --- compare / rate / report: LIMA §4's evaluation (limajax.evaluation) -------------------------


def judge_options(required=True):
    """The options every command that asks an LLM judge takes (`required=False`: compare, whose
    --human needs no judge; the help says so)."""
    needed = "" if required else " Needed unless --human."
    options = [
        click.option("--judge-url", required=required, metavar="URL",
                     help="An OpenAI-compatible base URL, e.g. https://api.openai.com/v1 or "
                     "http://127.0.0.1:8000/v1 (limajax serve, vLLM, llama.cpp's server)."
                     + needed),
        click.option("--judge-model", required=required, metavar="NAME",
                     help="The model the endpoint should judge with, e.g. gpt-4." + needed),
        *client_options("judge"),
        click.option("--judge-max-tokens", default=1024, show_default=True,
                     type=click.IntRange(min=1), help="Longest answer the judge may write."),
        click.option("--template", "template_path", default=None,
                     type=click.Path(dir_okay=False, path_type=str),
                     help="Replace the packaged prompt template (same {placeholders})."),
        progress_option,
    ]

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def failed_notice(failed: dict[str, int]) -> None:
    """Say how many failed rows (prompts an endpoint refused) were left out of each file."""
    for path, n in failed.items():
        if n:
            click.echo(f"notice: left out {n} failed rows of {path} (prompts the endpoint "
                       "refused: they hold no answer; `limajax sample --endpoint ... "
                       "--retry-failed` asks again)", err=True)


def _judge(judge_url, judge_model, api_key_env, concurrency, timeout, judge_max_tokens,
           max_retries):
    from limajax.evaluation.judge import Judge

    return Judge(judge_url, judge_model, api_key_env=api_key_env, timeout=timeout,
                 max_retries=max_retries, concurrency=concurrency, max_tokens=judge_max_tokens)


common_option = click.option(
    "--common", is_flag=True,
    help="Leave out, on purpose, the prompt ids only one file has (they are named); without "
    "it such ids are refused.")


def say_left_out(note: str | None) -> None:
    """compare / annotate with --common: which ids were left out, on stderr."""
    if note:
        click.echo(f"notice: {note}; only the shared ones are used (--common)", err=True)


# Judgments are appended as they arrive, so an interrupted compare / rate / select keeps them.
JUDGING_INTERRUPTED = ("interrupted: finished judgments are saved; rerun the same command to "
                       "continue")


@main.command()
@click.option("--a", "a_path", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Sample file A (JSONL from `limajax sample`: id, conversations, response).")
@click.option("--b", "b_path", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Sample file B, answering the same prompt ids (see --common).")
@common_option
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Judgments JSONL, appended to as judgments arrive; a rerun skips what is "
              "there.")
@click.option("--orders", type=click.Choice(["both", "one"]), default="both", show_default=True,
              help="both: each pair judged with A shown first and with B shown first; one: "
              "each pair once, the answer shown first drawn from (--seed, id) as annotate does.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="With --orders one: which answer each prompt shows first.")
@click.option("--human", "labels_path", default=None,
              type=click.Path(dir_okay=False, path_type=str),
              help="Instead of a judge: the labels exported from `limajax annotate`'s sheet.")
@judge_options(required=False)
@user_errors(interrupted=JUDGING_INTERRUPTED)
def compare(a_path, b_path, common, output, judge_url, judge_model, api_key_env, orders, seed,
            concurrency, timeout, judge_max_tokens, max_retries, template_path, labels_path,
            progress):
    """Ask a judge LIMA §4.1's question for every prompt both sample files answered: is A
    significantly better, B significantly better, or neither? Both orders by default; the
    outcome is A if A wins both, B if B wins both, a tie otherwise.

    Example: limajax compare --a lima.jsonl --b base.jsonl --judge-url
    https://api.openai.com/v1 --judge-model gpt-4 --api-key-env OPENAI_API_KEY --output j.jsonl
    """
    if labels_path is not None:
        if judge_url or judge_model:
            raise UserError("--human takes no --judge-url / --judge-model")
        from limajax.evaluation.human import labels_to_judgments

        n, left_out = labels_to_judgments(labels_path, a_path, b_path, output, common=common)
        say_left_out(left_out)
        click.echo(f"wrote {n} human judgments to {output}")
        return
    if not judge_url or not judge_model:
        raise UserError("compare needs --judge-url URL and --judge-model NAME (or --human "
                        "LABELS.json for people's labels)")
    from limajax.evaluation.compare import compare as compare_lib

    r = compare_lib(a_path, b_path, _judge(judge_url, judge_model, api_key_env, concurrency,
                                           timeout, judge_max_tokens, max_retries),
                    output, orders=orders, template_path=template_path, progress=progress,
                    common=common, seed=seed)
    say_left_out(r["left_out"])
    if r["torn_line_dropped"]:
        click.echo(f"notice: dropped the unfinished last line of {output} (a run was killed "
                   "while writing it)", err=True)
    failed_notice(r["failed"])
    o = r["outcomes"]
    click.echo(f"{r['prompts']} prompts: A {o['A']}, tie {o['tie']}, B {o['B']}, unparsed "
               f"{o['unparsed']} ({r['judged']} judged now, {r['cached']} already in {output}, "
               f"{r['retries']} retries) -> {output}")


@main.command()
@click.option("--a", "a_path", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Sample file A.")
@click.option("--b", "b_path", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Sample file B; the sheet holds the prompts both answered (see --common).")
@common_option
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="The HTML sheet (one self-contained file; open it in any browser).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seeds which answer is shown on the left, per prompt.")
@user_errors
def annotate(a_path, b_path, common, output, seed):
    """An annotation sheet for people (LIMA §4.1): each prompt with both answers side by side
    (left and right drawn from the seed), LIMA's three choices with keyboard shortcuts, work kept
    in the browser across reloads, and an export of the labels as JSON for `compare --human`.

    Example: limajax annotate --a lima.jsonl --b gpt4.jsonl --output sheet.html
    """
    from limajax.evaluation.human import annotate as annotate_lib

    n, left_out, failed = annotate_lib(a_path, b_path, output, seed=seed, common=common)
    say_left_out(left_out)
    failed_notice(failed)
    click.echo(f"wrote {output}: {n} prompts; label them in a browser, export, then "
               f"`limajax compare --human labels.json --a {a_path} --b {b_path} --output ...`")


@main.command()
@click.option("--samples", "samples_path", required=True,
              type=click.Path(dir_okay=False, path_type=str),
              help="A sample file (several rows per id with distinct \"sample\" for --rubric "
              "scale, from `limajax sample --num-samples 5`).")
@click.option("--rubric", type=click.Choice(["grade", "scale"]), default="grade",
              show_default=True,
              help="grade: Fail / Pass / Excellent (LIMA §4.3); scale: helpfulness 1-6 (§5).")
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Ratings JSONL, appended to as ratings arrive; a rerun skips what is there.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Also write the summary as JSON.")
@click.option("--per-turn", is_flag=True,
              help="Grade every assistant turn of conversations (`chat --record` rows): the "
              "share of each grade per turn and the conversations at Pass or better through "
              "turn k (LIMA §6).")
@judge_options()
@user_errors(interrupted=JUDGING_INTERRUPTED)
def rate(samples_path, rubric, output, json_path, per_turn, judge_url, judge_model, api_key_env,
         concurrency, timeout, judge_max_tokens, max_retries, template_path, progress):
    """Rate each answer on its own: Fail / Pass / Excellent, or helpfulness 1-6 with the mean
    and its 95% bootstrap interval over prompts.

    Example: limajax rate --samples lima-x5.jsonl --rubric scale --judge-url
    https://api.openai.com/v1 --judge-model gpt-3.5-turbo --api-key-env OPENAI_API_KEY
    --output ratings.jsonl
    """
    from limajax.evaluation.rate import rate as rate_lib
    from limajax.files import write_json

    s = rate_lib(samples_path, rubric, _judge(judge_url, judge_model, api_key_env, concurrency,
                                              timeout, judge_max_tokens, max_retries),
                 output, template_path=template_path, progress=progress, per_turn=per_turn)
    failed_notice(s["failed"])
    if rubric == "grade":
        figures = ", ".join(f"{g} {s['counts'][g]} ({s['percent'][g] or 0:.0f}%)"
                            for g in s["counts"])
    else:
        figures = ("no rating" if s["mean"] is None else
                   f"mean {s['mean']:.2f} [95% {s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}] over "
                   f"{s['prompts']} prompts")
    click.echo(f"{s['ratings']} ratings: {figures}, unparsed {s['unparsed']} "
               f"({s['judged']} rated now) -> {output}")
    for t in s.get("per_turn", []):
        through = t["through"]
        stay = ("-" if through["percent"] is None else
                f"{through['pass_or_better']}/{through['conversations']} "
                f"({through['percent']:.0f}%, 95% {through['ci95'][0]:.0f}-"
                f"{through['ci95'][1]:.0f}%)")
        shares = ", ".join(f"{g} {t['counts'][g]}" for g in t["counts"])
        click.echo(f"turn {t['turn']}: {shares}; Pass or better through turn {t['turn']}: "
                   f"{stay}")
    if json_path:
        write_json(json_path, s)


@main.command()
@click.option("--workdir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="A training workdir with a checkpoint per epoch.")
@click.option("--epochs", "epochs_spec", default="5-10", show_default=True,
              help="The epochs to choose from (LIMA App. B: 5-10), e.g. 5-10 or 5,7,9.")
@click.option("--prompts", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Dev dialogues (GAIR rows); a trailing reference answer is not shown.")
@click.option("--method", type=click.Choice(["pairwise", "scale"]), default="pairwise",
              show_default=True,
              help="pairwise: every epoch against every other (LIMA §4.1's question, both "
              "orders); scale: 5 samples per prompt rated 1-6 (LIMA §5).")
@click.option("--perplexity", is_flag=True,
              help="Also each epoch's perplexity on the dev dialogues (LIMA App. B).")
@click.option("--output-dir", default=None, type=click.Path(file_okay=False, path_type=str),
              help="Where samples, judgments and selection.json go (default: WORKDIR/selection).")
@click.option("--fallback", type=click.Choice(["perplexity"]), default=None,
              help="If no epoch gets a readable verdict, choose the lowest dev perplexity (and "
              "say so) instead of choosing nothing and exiting 2.")
@sampling_options
@judge_options()
@user_errors(interrupted=JUDGING_INTERRUPTED)
def select(workdir, epochs_spec, prompts, method, perplexity, output_dir, fallback, temperature,
           top_p, repetition_penalty, max_new_tokens, greedy, seed, mesh, judge_url, judge_model,
           api_key_env, concurrency, timeout, judge_max_tokens, max_retries, template_path,
           progress):
    """Choose a checkpoint by the quality of its dev-set answers, as LIMA did by hand (App. B):
    sample the dev prompts from each epoch, judge the epochs, and write selection.json with the
    ranking and its evidence. Rerunning continues where it stopped.

    Example: limajax select --workdir runs/lima-65b --epochs 5-10 --prompts dev.jsonl
    --judge-url https://api.openai.com/v1 --judge-model gpt-4 --api-key-env OPENAI_API_KEY
    """
    from limajax import sharding
    from limajax.evaluation.selection import parse_epochs

    epochs = parse_epochs(epochs_spec)
    judge = _judge(judge_url, judge_model, api_key_env, concurrency, timeout, judge_max_tokens,
                   max_retries)
    judge.api_key()  # before minutes of sampling
    sharding.start(mesh)
    from limajax.evaluation.selection import select as select_lib

    s = select_lib(workdir, epochs, prompts, judge, method=method, perplexity=perplexity,
                   output_dir=output_dir, mesh=mesh, template_path=template_path,
                   settings=sampling_settings(temperature, top_p, repetition_penalty,
                                              max_new_tokens, greedy, seed),
                   progress=progress, fallback=fallback)
    for r in s["ranking"]:
        score = f"{r['score']:.3f}" if r["judged"] else "not judged"
        ppl = f", perplexity {r['perplexity']:.2f}" if "perplexity" in r else ""
        click.echo(f"epoch {r['epoch']}: {score}{ppl}")
    by = s["score"] if s["chosen_by"] == "score" else s["chosen_by"]
    click.echo(f"best: epoch {s['best']} ({by}) -> {s['selection_json']}")


@main.command()
@click.option("--judgments", "paths", required=True, multiple=True,
              type=click.Path(dir_okay=False, path_type=str),
              help="Judgment files from `compare` (repeatable).")
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="The Markdown report.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="A PNG bar chart in the manner of LIMA's Figure 1.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="SUMMARY.json: the same figures, one object per comparison.")
@click.option("--agreement", is_flag=True,
              help="Several judges of the same comparison are expected: report each and their "
              "agreement (otherwise mixing judges or templates is an error).")
@click.option("--resamples", default=2000, show_default=True, type=click.IntRange(min=2000),
              help="Bootstrap resamples over prompts (at least 2000, for a stable 95% "
              "interval).")
@click.option("--seed", default=0, show_default=True, type=int, help="Bootstrap seed.")
@user_errors
def report(paths, output, plot_path, json_path, agreement, resamples, seed):
    """Win / tie / loss per comparison with 95% bootstrap intervals, "as good or better",
    unparsed verdicts, position disagreement, the length split and judges' agreement.

    Example: limajax report --judgments j.jsonl --output report.md --plot fig1.png --json
    summary.json
    """
    from limajax.evaluation.report import report as report_lib

    summary = report_lib(list(paths), output, plot_path=plot_path, json_path=json_path,
                         agreement=agreement, resamples=resamples, seed=seed)
    for c in summary["comparisons"]:
        k, good = c["counts"], c["as_good_or_better"]["percent"]
        click.echo(f"{c['a']} vs {c['b']} ({c['judge']}): {c['n']} prompts, A {k['a_wins']}, "
                   f"tie {k['ties']}, B {k['b_wins']}, unparsed {k['unparsed']}; A as good or "
                   "better " + ("-" if good is None else f"{good:.1f}%"))
    click.echo("wrote " + ", ".join(p for p in (output, plot_path, json_path) if p))


# --- demo: the whole pipeline on a tiny model (limajax.demo) ------------------------------------


@main.command()
@click.option("--workdir", default="runs/demo", show_default=True,
              type=click.Path(path_type=str), help="Where every step writes its output.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Fine-tuning epochs (default: configs/tiny.py's).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing --workdir that an earlier demo made (nothing else).")
@user_errors
def demo(workdir, epochs, overwrite):
    """The whole pipeline on a tiny model and the embedded sample data, on a laptop CPU.

    A tokenizer, a random tiny LLaMA as a Hugging Face checkpoint, convert, export, data
    prepare, fine-tune with LIMA's recipe on a simulated 2x4 mesh, score before and after; then
    LIMA §4: sample the held-out prompts from the base and the fine-tuned model, compare them
    with a judge in both orders (an external one if LIMAJAX_JUDGE_URL is set, else limajax's
    own serve of the tiny model, whose verdicts are noise), report, chart and annotation sheet.

    Example: limajax demo --workdir runs/demo
    """
    from limajax import sharding
    from limajax.demo import recipe, run_demo

    sharding.start(recipe().mesh)  # simulated on a CPU host

    run_demo(workdir, epochs=epochs, overwrite=overwrite)
