"""``tlfx evaluate``: score a model on a labeled feature store."""

import json

import click

from ._trust import trust_options


@click.command()
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False), metavar="M",
              help="Model file (tlfx fit, tlfx finetune).")
@click.option("--features", required=True, type=click.Path(dir_okay=False), metavar="T.h5",
              help="Labeled test store extracted with the model's backbone configuration.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@trust_options
@click.option("--allow-incomplete", is_flag=True, help="Evaluate on a store whose extraction has not finished.")
def evaluate(model_path, features, as_json, trust_types, trust_pickle, allow_incomplete):
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix of a model on a store.

    A store made with another backbone configuration than the model's is refused.

    \b
    Examples:
      tlfx evaluate --model svm.tlfx --features test.h5
      tlfx evaluate --model svm.tlfx --features test.h5 --json > svm.json
    """
    from ..api import evaluate as evaluate_model
    from ..metrics import format_report
    from ..safetext import terminal

    rep = evaluate_model(model_path, features, trust_types=trust_types, trust_pickle=trust_pickle,
                         allow_incomplete=allow_incomplete)
    if as_json:
        click.echo(json.dumps(rep, indent=2))
    else:
        norm = f", {rep['normalize']} normalisation" if rep.get("normalize", "none") != "none" else ""
        title = terminal(f"{model_path} ({rep.get('head') or rep['kind']}{norm}) on {features}")
        click.echo(format_report(printable(rep), title=title))


def printable(rep: dict) -> dict:
    """The report with its class names escaped for the terminal (they come from the model or store file)."""
    from ..safetext import terminal

    return {**rep, "class_names": [terminal(n) for n in rep.get("class_names", [])],
            "per_class": [{**r, "class": terminal(r["class"])} for r in rep.get("per_class", [])]}


COMMANDS = [evaluate]
