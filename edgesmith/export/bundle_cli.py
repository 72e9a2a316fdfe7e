"""`edgesmith bundle`: a compress result as the asset folder of an Android or iOS app."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from edgesmith.errors import EdgesmithError, ResultsError


def bundle(
    result: Path = typer.Argument(..., help="The -o folder of `edgesmith compress` (or, with "
                                             "--verify, a bundle folder)."),
    output: Path = typer.Option(None, "--output", "-o", help="The bundle folder to write."),
    platform: str = typer.Option(None, "--platform",
                                 help="android or ios (default: from the artifact's format: "
                                      "LiteRT -> android, Core ML -> ios)."),
    ctx: int = typer.Option(None, "--ctx", help="Context length the app runs the model at "
                                                "(default: the model's, at most 4096)."),
    verify: bool = typer.Option(False, "--verify",
                                help="Check that the bundle folder RESULT matches its "
                                     "bundle.json (every file's size and sha256, no extras)."),
    force: bool = typer.Option(False, "--force", help="Overwrite files of an existing bundle."),
    as_json: bool = typer.Option(False, "--json", help="Print the bundle manifest on stdout."),
) -> None:
    """Copy the model files of a compress result, its tokenizer, chat template and generation
    defaults into an app's asset folder, with bundle.json: every file's sha256 and size, the
    context length, the expected RAM, the quality figures and the edgesmith version.

    Example: edgesmith bundle out/android/ -o MyApp/app/src/main/assets/model/

    Example: edgesmith bundle out/ios/ --platform ios -o MyApp/Resources/Model/

    Example: edgesmith bundle --verify MyApp/Resources/Model/
    """
    from edgesmith.export import bundle as bundle_mod

    err = Console(stderr=True)
    if verify:
        if output is not None:
            raise EdgesmithError("--verify checks a bundle folder and writes nothing",
                                 "drop -o: edgesmith bundle --verify DIR")
        report = bundle_mod.verify(result)
        if as_json:
            sys.stdout.write(json.dumps(report, indent=2) + "\n")
        if not report["ok"]:
            raise ResultsError(f"{result} does not match its bundle.json: "
                               f"{'; '.join(report['problems'][:3])}"
                               + (f" (+{len(report['problems']) - 3} more)"
                                  if len(report["problems"]) > 3 else ""),
                               "rebuild it with edgesmith bundle ... --force")
        if not as_json:
            err.print(f"{result}: all {report['files']} files match bundle.json")
        return
    if output is None:
        raise EdgesmithError("bundle needs an output folder", "add -o DIR")
    from edgesmith.context import make_progress

    with make_progress(quiet=as_json) as progress:
        man = bundle_mod.build(result, output, platform, force=force, ctx=ctx,
                               progress=progress)
    if as_json:
        sys.stdout.write(json.dumps(man, indent=2) + "\n")
        return
    mem = man["memory"]
    fit = man.get("fit") or {}
    err.print(f"{man['platform']} bundle in {output}: {len(man['files'])} files, model "
              f"{mem['weights_bytes'] / 1e6:.1f} MB, about {mem['total_bytes'] / 1e6:.0f} MB of "
              f"RAM at {mem['ctx']} tokens"
              + (f" ({'fits' if fit['fits'] else 'does NOT fit'} {fit['target']})" if fit
                 else ""))
    task = man.get("mediapipe_task")
    if task and not task["built"]:
        err.print(f"MediaPipe .task: {task['why']}")


def register(app: typer.Typer) -> None:
    """Add the `bundle` command to ``app``."""
    app.command("bundle")(bundle)
