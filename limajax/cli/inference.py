"""The model answering: `limajax score` (limajax.perplexity), `sample` (LIMA's generation
settings over prompt files, limajax.sampling), `chat` (a conversation in the terminal,
limajax.chat) and `serve` (an OpenAI-compatible HTTP server with continuous batching,
limajax.serving)."""

import click

from limajax import cli
from limajax.errors import UserError


@cli.main.command()
@cli.model_source_options
@click.option("--input", "input_path", required=True, type=click.Path(path_type=str),
              help='JSONL rows {"id", "text"}; BOS is prepended, no chat format.')
@click.option("--output", "output_path", required=True, type=click.Path(path_type=str),
              help='JSONL rows adding "token_ids", "logprobs", "nll", "ppl" and "trimmed" '
              "(missing directories are created).")
@cli.mesh_option()
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Texts per forward pass (rounded up to a multiple of the mesh's data axis).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
def score(model_dir, workdir, epoch, input_path, output_path, mesh, batch_size, overwrite):
    """Log-probability of every token of each text, and its perplexity (LIMA App. B).

    Example: limajax score --model runs/tiny-model --input texts.jsonl --output scores.jsonl
    """
    source, epoch = cli.model_source(model_dir, workdir, epoch)
    cli.start_devices(mesh)
    from limajax import perplexity

    summary = perplexity.score_file(source, input_path, output_path, mesh, batch_size,
                                    epoch=epoch, overwrite=overwrite)
    click.echo(perplexity.format_summary(summary, output_path))


# `sample --endpoint`: answers from a model behind an OpenAI-compatible API.
endpoint_options = cli.options(
    click.option("--endpoint", "endpoint_url", default=None, metavar="URL",
                 help="Answer through an OpenAI-compatible API instead of a local model (its "
                 "base URL, e.g. https://api.openai.com/v1 or a vLLM or limajax serve at "
                 "http://127.0.0.1:8000/v1); with --prompts and --output."),
    click.option("--endpoint-model", default=None, metavar="NAME",
                 help="With --endpoint: the model to ask, as its /models lists it."),
    *cli.client_options("endpoint"),
    click.option("--retry-failed", is_flag=True,
                 help="With --endpoint: ask again the prompts an earlier run recorded as "
                 "refused (failed rows); by default a rerun asks only for missing rows."))


@cli.main.command()
@cli.model_source_options
@click.option("--prompts", "prompts_path", type=click.Path(path_type=str), default=None,
              help='Prompts as GAIR rows {"id", "conversations": [...]}, or any format '
              "`data prepare` reads (Alpaca, ShareGPT, OpenAI messages; JSONL or a JSON array).")
@click.option("--output", "output_path", type=click.Path(path_type=str), default=None,
              help="JSONL answers (with --prompts); rows already there are skipped.")
@click.option("--prompt", "text", default=None, help="Answer this one prompt and print it.")
@cli.sampling_options
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
@cli.progress_option
@cli.interrupted("interrupted: the answers finished so far are in --output; the same command "
                 "continues from there")
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
        return sample_endpoint(**click.get_current_context().params)
    if retry_failed:
        raise UserError("--retry-failed goes with --endpoint (local sampling never refuses)")
    source, epoch = cli.model_source(model_dir, workdir, epoch)
    cli.start_devices(mesh)
    from limajax import sampling

    settings = cli.sampling_settings()

    if text is not None:
        answers = sampling.sample_text(source, text, settings, epoch=epoch,
                                       num_samples=num_samples, mesh_spec=mesh, raw=raw,
                                       template=template)
        for k, answer in enumerate(answers):
            if num_samples > 1:
                click.echo(f"--- sample {k}")
            click.echo(answer)
        return
    summary = sampling.sample_file(source, prompts_path, output_path, settings, epoch=epoch,
                                   num_samples=num_samples, batch_size=batch_size,
                                   mesh_spec=mesh, raw=raw, template=template,
                                   progress=progress)
    click.echo(sampling.answers.format_summary(summary, output_path))


def sample_endpoint(model_dir, workdir, prompts_path, output_path, text, repetition_penalty,
                    num_samples, raw, template, endpoint_url, endpoint_model, api_key_env,
                    concurrency, timeout, max_retries, retry_failed, progress, **_):
    """`sample --endpoint URL --endpoint-model NAME --prompts ... --output ...`."""
    if endpoint_url is None or endpoint_model is None:
        raise UserError("give --endpoint URL and --endpoint-model NAME together")
    if model_dir is not None or workdir is not None:
        raise UserError("--endpoint answers instead of a local model: give no --model / "
                        "--workdir")
    if text is not None:
        raise UserError("--endpoint takes --prompts FILE.jsonl --output OUT.jsonl, not --prompt")
    from limajax.endpoint import Endpoint
    from limajax.sampling.endpoint import answer_file, format_summary, sent_settings

    settings = cli.sampling_settings()
    ep = Endpoint(endpoint_url, endpoint_model, api_key_env=api_key_env, timeout=timeout,
                  max_retries=max_retries, concurrency=concurrency)
    s = answer_file(ep, prompts_path, output_path, sent_settings(settings, repetition_penalty),
                    num_samples=num_samples, raw=raw, retry_failed=retry_failed,
                    template=template, progress=progress)
    click.echo(format_summary(s, endpoint_model, output_path))


@cli.main.command()
@cli.model_source_options
@cli.sampling_options
@click.option("--record", "record_path", default=None,
              type=click.Path(dir_okay=False, path_type=str),
              help="Append each finished conversation (at /reset and at the end) to this JSONL "
              "file as a GAIR row with the settings and checkpoint, for `rate --per-turn` "
              "(LIMA §6).")
def chat(model_dir, workdir, epoch, temperature, top_p, repetition_penalty, max_new_tokens,
         greedy, seed, mesh, record_path):
    """Talk with the model in LIMA's dialogue format, the answer streaming in as it is made.

    /reset forgets the conversation, /settings shows (and `/settings temperature=0.5` changes)
    the sampling settings, /exit or Ctrl-D quits, Ctrl-C stops an answer. When the history
    outgrows the context, the oldest turns are dropped (and it says so).

    Example: limajax chat --workdir runs/lima-65b --epoch 7 [--record conversations.jsonl]
    """
    source, epoch = cli.model_source(model_dir, workdir, epoch)
    cli.start_devices(mesh)
    from limajax.chat import chat as chat_lib

    chat_lib(source, cli.sampling_settings(), epoch=epoch, mesh_spec=mesh, record_path=record_path)


@cli.main.command()
@cli.model_source_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback: only this machine can connect).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port to listen on.")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(min=1),
              help="Decode slots: answers generated at once (continuous batching).")
@click.option("--context", type=click.IntRange(min=2), default=None,
              help="Tokens per slot, prompt and answer together (default and most: 2048, or "
              "the model's context if shorter).")
@cli.mesh_option()
@click.option("--name", default=None, help="The model id in /v1/models (default: the path).")
@click.option("--api-key-env", default=None, metavar="VAR",
              help="Require 'Authorization: Bearer KEY' with KEY read from the environment "
              "variable VAR (never from the command line; never logged).")
@click.option("--no-auth", is_flag=True,
              help="Serve a non-loopback --host without a key (refused otherwise).")
def serve(model_dir, workdir, epoch, host, port, max_batch, context, mesh, name, api_key_env,
          no_auth):
    """Serve the model over an OpenAI-compatible HTTP API: /v1/chat/completions (LIMA's
    dialogue format), /v1/completions (plain continuation), /v1/models, /health; streaming,
    n, stop, seed and a `repetition_penalty` extension; omitted settings are LIMA §4.1's.

    Example: limajax serve --workdir runs/lima-65b --epoch 7 --port 8000
    """
    source, epoch = cli.model_source(model_dir, workdir, epoch)
    cli.start_devices(mesh)
    from limajax.serving import serve as serve_lib

    serve_lib(source, epoch=epoch, host=host, port=port, max_batch=max_batch, mesh_spec=mesh,
              context=context, name=name, api_key_env=api_key_env, no_auth=no_auth)
