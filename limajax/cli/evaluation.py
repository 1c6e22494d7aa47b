"""`limajax compare`, `annotate`, `rate`, `select`, `report`: LIMA §4's evaluation."""

import click

from limajax import cli
from limajax.errors import UserError


def judge_options(required=True):
    """The options every command that asks an LLM judge takes (`required=False`: compare, whose
    --human needs no judge; the help says so)."""
    needed = "" if required else " Needed unless --human."
    return cli.options(
        click.option("--judge-url", required=required, metavar="URL",
                     help="An OpenAI-compatible base URL, e.g. https://api.openai.com/v1 or "
                     "http://127.0.0.1:8000/v1 (limajax serve, vLLM, llama.cpp's server)."
                     + needed),
        click.option("--judge-model", required=required, metavar="NAME",
                     help="The model the endpoint should judge with, e.g. gpt-4." + needed),
        *cli.client_options("judge"),
        click.option("--judge-max-tokens", default=1024, show_default=True,
                     type=click.IntRange(min=1), help="Longest answer the judge may write."),
        click.option("--template", "template_path", default=None,
                     type=click.Path(dir_okay=False, path_type=str),
                     help="Replace the packaged prompt template (same {placeholders})."),
        cli.progress_option)


def _judge(judge_url, judge_model, api_key_env, concurrency, timeout, judge_max_tokens,
           max_retries, **_):
    """The judge judge_options describe (called with those options of the command)."""
    from limajax.evaluation.judge import Judge

    return Judge(judge_url, judge_model, api_key_env=api_key_env, timeout=timeout,
                 max_retries=max_retries, concurrency=concurrency, max_tokens=judge_max_tokens)


common_option = click.option(
    "--common", is_flag=True,
    help="Leave out, on purpose, the prompt ids only one file has (they are named); without "
    "it such ids are refused.")


# Judgments are appended as they arrive, so an interrupted compare / rate / select keeps them.
JUDGING_INTERRUPTED = ("interrupted: finished judgments are saved; rerun the same command to "
                       "continue")


@cli.main.command()
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
@cli.interrupted(JUDGING_INTERRUPTED)
def compare(a_path, b_path, common, output, judge_url, judge_model, orders, seed, template_path,
            labels_path, progress, **client):
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

        n = labels_to_judgments(labels_path, a_path, b_path, output, common=common)
        click.echo(f"wrote {n} human judgments to {output}")
        return
    if not judge_url or not judge_model:
        raise UserError("compare needs --judge-url URL and --judge-model NAME (or --human "
                        "LABELS.json for people's labels)")
    from limajax.evaluation import compare as compare_lib

    r = compare_lib.compare(a_path, b_path, _judge(judge_url, judge_model, **client), output,
                            orders=orders, template_path=template_path, progress=progress,
                            common=common, seed=seed)
    click.echo(compare_lib.format_summary(r, output))


@cli.main.command()  # --a/--b as compare's on purpose: each command's help says what it does
@click.option("--a", "a_path", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Sample file A.")
@click.option("--b", "b_path", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Sample file B; the sheet holds the prompts both answered (see --common).")
@common_option
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="The HTML sheet (one self-contained file; open it in any browser).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seeds which answer is shown on the left, per prompt.")
def annotate(a_path, b_path, common, output, seed):
    """An annotation sheet for people (LIMA §4.1): each prompt with both answers side by side
    (left and right drawn from the seed), LIMA's three choices with keyboard shortcuts, work kept
    in the browser across reloads, and an export of the labels as JSON for `compare --human`.

    Example: limajax annotate --a lima.jsonl --b gpt4.jsonl --output sheet.html
    """
    from limajax.evaluation.human import annotate as annotate_lib

    n = annotate_lib(a_path, b_path, output, seed=seed, common=common)
    click.echo(f"wrote {output}: {n} prompts; label them in a browser, export, then "
               f"`limajax compare --human labels.json --a {a_path} --b {b_path} --output ...`")


@cli.main.command()
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
@cli.interrupted(JUDGING_INTERRUPTED)
def rate(samples_path, rubric, output, json_path, per_turn, template_path, progress, **judge):
    """Rate each answer on its own: Fail / Pass / Excellent, or helpfulness 1-6 with the mean
    and its 95% bootstrap interval over prompts.

    Example: limajax rate --samples lima-x5.jsonl --rubric scale --judge-url
    https://api.openai.com/v1 --judge-model gpt-3.5-turbo --api-key-env OPENAI_API_KEY
    --output ratings.jsonl
    """
    from limajax.evaluation import rate as rate_lib
    from limajax.files import write_json

    s = rate_lib.rate(samples_path, rubric, _judge(**judge), output,
                      template_path=template_path, progress=progress, per_turn=per_turn)
    click.echo(rate_lib.format_summary(s, output))
    if json_path:
        write_json(json_path, s)


@cli.main.command()
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
@cli.sampling_options
@judge_options()
@cli.interrupted(JUDGING_INTERRUPTED)
def select(workdir, epochs_spec, prompts, method, perplexity, output_dir, fallback, mesh,
           template_path, progress, **options):  # the judge's options and the sampler's
    """Choose a checkpoint by the quality of its dev-set answers, as LIMA did by hand (App. B):
    sample the dev prompts from each epoch, judge the epochs, and write selection.json with the
    ranking and its evidence. Rerunning continues where it stopped.

    Example: limajax select --workdir runs/lima-65b --epochs 5-10 --prompts dev.jsonl
    --judge-url https://api.openai.com/v1 --judge-model gpt-4 --api-key-env OPENAI_API_KEY
    """
    cli.start_devices(mesh)
    from limajax.evaluation import selection

    epochs = selection.parse_epochs(epochs_spec)
    judge = _judge(**options)  # the sampler's are read by sampling_settings
    judge.api_key()  # before minutes of sampling
    s = selection.select(workdir, epochs, prompts, judge, method=method, perplexity=perplexity,
                         output_dir=output_dir, mesh=mesh, template_path=template_path,
                         settings=cli.sampling_settings(),
                         progress=progress, fallback=fallback)
    click.echo(selection.format_summary(s))


@cli.main.command()
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
@click.option("--name", "names", multiple=True, metavar="FILE=LABEL",
              help="Show the sample file FILE (its name less .jsonl, as the report shows it) as "
              "LABEL in the chart's legend and bars and the report's tables, e.g. --name "
              "answers-lima=LIMA-65B --name answers-base=LLaMA-65B (repeatable; a label may "
              "hold commas).")
def report(paths, output, plot_path, json_path, agreement, resamples, seed, names):
    """Win / tie / loss per comparison with 95% bootstrap intervals, "as good or better",
    unparsed verdicts, position disagreement, the length split and judges' agreement.

    Example: limajax report --judgments j.jsonl --output report.md --plot fig1.png --json
    summary.json
    """
    from limajax.evaluation import report as report_lib

    summary = report_lib.report(list(paths), output, plot_path=plot_path, json_path=json_path,
                                agreement=agreement, resamples=resamples, seed=seed,
                                names=report_lib.parse_names(names))
    click.echo(report_lib.format_summary(summary))
    click.echo("wrote " + ", ".join(p for p in (output, plot_path, json_path) if p))
