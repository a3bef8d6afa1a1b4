"""The ``sam-onnx`` command: one click sub-command per job.

Expected failures (SamOnnxError) print one line naming the problem and the fix, and exit
non-zero without a traceback.
"""
from __future__ import annotations

import functools
import logging
import signal
import sys
import traceback
import warnings
from pathlib import Path

import click

from .core import logs
from .core.errors import SamOnnxError
from .families import CONTRACTS, CONVERTIBLE, EXPORTED_DECODERS, MODEL_NAMES


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that it cleans up as on Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated


def _expected_errors(interrupted: str = "no file was left half-written"):
    """Expected failures as one line and a non-zero exit, without a traceback (``--debug``
    shows it): SamOnnxError (exit 1), an OSError the system raised (a full disk, a path that
    cannot be written; exit 1), Ctrl-C (130) and SIGTERM (143), which also say what
    ``interrupted`` leaves."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (SamOnnxError, OSError) as exc:
                if (click.get_current_context().obj or {}).get("debug"):
                    traceback.print_exc()
                raise click.ClickException(_one_line(exc)) from None
            except KeyboardInterrupt as exc:
                what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
                click.echo(f"Error: {what}; {interrupted}", err=True)
                sys.exit(143 if isinstance(exc, Terminated) else 130)
        return wrapper
    return decorate


def _one_line(exc: Exception) -> str:
    """The message of an expected error; an OSError as "PATH: why; fix"."""
    if not isinstance(exc, OSError):
        return str(exc)
    where = f"{exc.filename}: " if exc.filename else ""
    return (f"{where}{exc.strerror or exc}; check the path, its permissions and the free "
            "space, or pass another output path")


@click.group()
@click.version_option(package_name="sam-onnx")
@click.option("-v", "--verbose", is_flag=True, help="Also show the exporters' own messages.")
@click.option("--debug", is_flag=True, help="Show the traceback of an expected error too.")
@click.pass_context
def main(ctx: click.Context, verbose: bool, debug: bool) -> None:
    """Export Segment Anything to ONNX, validate and repair graphs, run and compare them."""
    ctx.obj = {"debug": debug}
    logs.setup(logging.DEBUG if verbose else logging.INFO)
    warnings.showwarning = _one_line_warning
    signal.signal(signal.SIGTERM, _terminate)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


def _options(*decorators):
    """Several click options as one decorator: an option group shared by commands."""
    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn
    return apply


def _model_option(**kw):
    return click.option("--model", "model_type", type=click.Choice(MODEL_NAMES),
                        help="Model name (tiny: a small SAM for tests).", **kw)


#: Where the weights come from: export, check and bench.
_weights_options = _options(
    click.option("--checkpoint", type=click.Path(path_type=Path),
                 help="Local checkpoint; by default the official one is downloaded and cached."),
    click.option("--random-weights", is_flag=True,
                 help="No checkpoint: seeded random weights, for trying the tool and tests."))

#: Which graphs to compare with PyTorch: check and bench.
_compared_graphs_options = _options(
    click.option("--encoder", type=click.Path(path_type=Path)),
    click.option("--decoder", type=click.Path(path_type=Path)),
    click.option("--export-to", type=click.Path(path_type=Path),
                 help="Export the graphs to this folder first, then use them."))

#: The graphs the runtime commands run: predict and segment.
_runtime_options = _options(
    click.option("--encoder", type=click.Path(path_type=Path), required=True),
    click.option("--decoder", type=click.Path(path_type=Path), required=True),
    click.option("--providers", default="cuda,cpu", show_default=True,
                 help="ONNX Runtime providers, in order of preference."))


def _providers(text: str) -> tuple:
    return tuple(text.split(","))


def _require_graphs(encoder, decoder, export_to) -> None:
    """check and bench: graphs to compare, or a folder to export them to (usage: exit 2)."""
    from .tools.check import require_graphs

    try:
        require_graphs(encoder, decoder, export_to)
    except SamOnnxError as exc:
        raise click.UsageError(str(exc)) from None


@main.command()
@_model_option(default="vit_h", show_default=True)
@_weights_options
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("exported"),
              show_default=True, help="Output folder.")
@click.option("--decoder-contract", type=click.Choice(EXPORTED_DECODERS), default="official",
              show_default=True, help="Which decoder inputs/outputs to export.")
@click.option("--return-single-mask", is_flag=True,
              help="The official decoder returning one mask, chosen by segment-anything's "
                   "select_masks (its export script's flag; what the ONNX notebook, the web "
                   "demo and AnyLabeling run): --decoder-contract official_single.")
@click.option("--encoder-contract", type=click.Choice(["tensor", "image"]), default="tensor",
              show_default=True,
              help="tensor: the pre-processed 1x3x1024x1024 input; image: the resized image "
                   "itself, HxWx3 RGB 0-255, normalized and padded inside the graph (what "
                   "AnyLabeling / X-AnyLabeling feed).")
@click.option("--opset", type=click.IntRange(18, 20), default=18, show_default=True,
              help="ONNX opset of both graphs (the exporters' common range).")
@click.option("--simplify", is_flag=True, help="Run onnxsim on graphs under 2 GB.")
@click.option("--quantize", type=click.Choice(["int8"]),
              help="Also write int8 dynamically quantized graphs, checked with their tolerance.")
@click.option("--encoder/--no-encoder", default=True, show_default=True)
@click.option("--decoder/--no-decoder", default=True, show_default=True)
@_expected_errors("nothing was written under the final names")
def export(return_single_mask, **options) -> None:
    """Export SAM's encoder and decoder, check them against PyTorch, write a manifest."""
    from .exporter.run import export as run_export

    if return_single_mask:
        if options["decoder_contract"] != "official":
            raise click.UsageError("--return-single-mask is the official decoder returning one "
                                   "mask; drop --decoder-contract "
                                   f"{options['decoder_contract']}")
        options["decoder_contract"] = "official_single"
    result = run_export(**options)
    for g in result.graphs:
        click.echo(f"{g.path}  [{g.contract.name}, {g.precision}]  {g.parity.summary()}")
    click.echo(f"{result.manifest}")
    if result.random_weights:
        click.echo("note: exported with RANDOM weights (marked in each graph's metadata); "
                   "masks from these graphs mean nothing")


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--feed", help="A contract name (official, lowres, batched), a .json description of "
              "names/dtypes/shapes, or an .npz of arrays.")
@click.option("--run", "run_", is_flag=True, help="Also run one inference (loads the weights).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "github"]), default="text",
              show_default=True)
@_expected_errors("nothing was written")
def validate(models, feed, run_, fmt) -> None:
    """Say how MODELS and a feed don't fit, before anything runs.

    Exit code 0: no errors; 1: errors; 2: a file could not be read or bad arguments.
    With an encoder and a decoder, also check that one's output fits the other.
    """
    from .graph import feeds
    from .graph import validate as validator
    from .graph.findings import Report
    from .tools.validate import validate as run_validate

    if feed is not None:
        try:
            loaded = feeds.load(feed)
        except SamOnnxError as exc:  # a wrong argument: exit 2, as click's usage errors
            raise click.BadParameter(str(exc), param_hint="--feed") from None
        # a contract name is made into a feed per graph (with the model's recorded dims)
        feed = feed if feed in CONTRACTS else loaded
    report, protos = Report(), []
    for model in models:
        one = run_validate(model, feed=feed, run=run_)
        report.extend(one)
        if not set(one.codes()) & validator.UNREADABLE:
            import onnx

            protos.append((str(model), onnx.load(str(model), load_external_data=False)))
    if len(protos) == 2:
        (na, a), (nb, b) = protos
        if validator.EMBEDDINGS & {i.name for i in a.graph.input}:  # decoder given first
            (na, a), (nb, b) = (nb, b), (na, a)
        report.extend(validator.validate_pair(a, b, (na, nb)))
    click.echo({"text": report.to_text, "json": report.to_json,
                "github": report.to_github}[fmt]())
    if set(report.codes()) & validator.UNREADABLE:
        sys.exit(2)
    sys.exit(0 if report.ok else 1)


def _pairs(ctx, param, values):
    try:
        return dict(v.split("=", 1) for v in values)
    except ValueError:
        raise click.BadParameter("use OLD=NEW, e.g. --rename images=image") from None


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the result.")
@click.option("--in-place", is_flag=True,
              help="Overwrite MODEL, keeping a copy (MODEL.bak, or .bak.N when that exists).")
@click.option("--rename", multiple=True, callback=_pairs, help="OLD=NEW input/output name.")
@click.option("--dynamic-points", is_flag=True, help="Make the point axis dynamic (num_points).")
@click.option("--drop-initializer-inputs", is_flag=True,
              help="Stop listing initializers as graph inputs.")
@click.option("--ir-version", type=int, help="Lower the IR version (e.g. to the runtime's).")
@click.option("--opset", type=int, help="Convert to this opset.")
@click.option("--external-data/--no-external-data", default=None,
              help="Keep weights in a .data file beside the graph, or inside it (under 2 GB).")
@click.option("--simplify", is_flag=True, help="Simplify with onnxsim.")
@click.option("--fp16", is_flag=True, help="float16 weights and compute, float32 inputs/outputs.")
@click.option("--contract", type=click.Choice(CONVERTIBLE),
              help="Adapt a decoder to this contract (add or remove has_mask_input, "
                   "orig_im_size and the upscaling; one mask or four; add pred_iou_thresh to "
                   "a many-prompt one).")
@click.option("--fix-crop", is_flag=True,
              help="Recompute masks from low_res_masks, for a decoder whose crop was frozen at "
                   "its export's image size (segment-anything 1.0's export).")
@click.option("--auto", "auto", is_flag=True, help="Apply what makes the graph take --feed.")
@click.option("--feed", help="With --auto: the contract whose feed the graph must take.")
@_expected_errors("nothing was written; the input is unchanged")
def repair(model, output, in_place, rename, auto, feed, **fixes) -> None:
    """Rewrite MODEL with named passes, validate and run the result, and compare it with the
    original where the passes keep the function."""
    from .tools.repair import repair as run_repair

    if auto and not feed:
        raise click.UsageError("--auto needs --feed CONTRACT (e.g. --feed official)")
    result = run_repair(model, output, rename=rename or None, in_place=in_place,
                        auto_feed=feed if auto else None, **fixes)
    for change in result.changes:
        click.echo(f"changed  {change}")
    if result.parity is not None:
        click.echo(f"parity   {result.parity.summary()}")
    click.echo(result.report.to_text())
    for backup in result.backups:
        click.echo(f"backup   {backup}")
    click.echo(f"wrote    {result.output}")


@main.command()
def doctor() -> None:
    """Print packages, available vs working providers (and why), CPU features, threads."""
    from .tools.doctor import report

    click.echo(report())


def _floats(text: str, n: tuple, what: str):
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in n:
        raise click.BadParameter(f"{what} takes {' or '.join(map(str, n))} comma-separated "
                                 f"numbers, got {text!r}")
    return values


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@_runtime_options
@click.option("--point", "points", multiple=True, help="X,Y[,LABEL] in image pixels; LABEL "
              "1 foreground (default), 0 background. Repeatable.")
@click.option("--box", help="X0,Y0,X1,Y1 in image pixels.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("mask.png"),
              show_default=True, help="The best mask as a black-and-white PNG.")
@click.option("--overlay", type=click.Path(path_type=Path), help="The image with the mask and "
              "prompts drawn on it.")
@click.option("--json", "as_json", is_flag=True, help="Print scores, areas and boxes as JSON.")
@_expected_errors()
def predict(image, encoder, decoder, points, box, out, overlay, as_json, providers) -> None:
    """Segment IMAGE from point and/or box prompts; write the mask and an overlay."""
    import json

    import numpy as np

    from .core.files import check_output
    from .runtime.images import load_image
    from .runtime.predictor import SamOnnxPredictor, check_prompt
    from .runtime.render import save_mask, save_overlay
    from .runtime.sessions import SessionConfig

    # everything that needs no graph is checked before the graphs load and the encoder runs
    if not points and not box:
        raise click.UsageError("give a prompt: --point X,Y[,LABEL] and/or --box X0,Y0,X1,Y1")
    parsed = [_floats(p, (2, 3), "--point") for p in points]
    coords = np.array([p[:2] for p in parsed]) if parsed else None
    labels = np.array([p[2] if len(p) == 3 else 1.0 for p in parsed]) if parsed else None
    box_arr = np.array(_floats(box, (4,), "--box")) if box else None
    for option, path in (("--out", out), ("--overlay", overlay)):
        if path is not None:
            check_output(path, option, [image, encoder, decoder])
    if overlay is not None and Path(overlay).resolve() == Path(out).resolve():
        raise click.UsageError("--out and --overlay name the same file; give each its own")
    rgb = load_image(image)
    check_prompt(coords, labels, box_arr, rgb.shape[:2])
    predictor = SamOnnxPredictor(encoder, decoder, SessionConfig(providers=_providers(providers)))
    predictor.set_image(rgb)
    masks, scores, _ = predictor.predict(coords, labels, box_arr,
                                         multimask_output=box_arr is None and len(parsed) == 1)
    best = int(np.argmax(scores))
    save_mask(masks[best], out)
    if overlay:
        save_overlay(rgb, masks[best], overlay, coords, labels, box_arr)
    summary = {"image": str(image), "mask": str(out), "overlay": str(overlay) if overlay else None,
               "best": best, "providers": predictor.decoder.active,
               "masks": [{"score": float(s), "area": int(m.sum()),
                          "bbox": _bbox(m)} for m, s in zip(masks, scores)]}
    click.echo(json.dumps(summary, indent=2) if as_json else
               f"wrote {out} (mask {best}, score {scores[best]:.3f}, "
               f"area {int(masks[best].sum())} px)")


def _bbox(mask) -> list:
    import numpy as np

    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
            int(ys.max() - ys.min() + 1)] if len(xs) else [0, 0, 0, 0]


@main.command()
@click.argument("inputs", nargs=-1, required=True)  # strings: a Path would fold s3:// to s3:/
@_runtime_options
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Folder for IMAGE.json (COCO-style, compressed RLE) and IMAGE.png (overlay).")
@click.option("--points-per-side", type=click.IntRange(1), default=32, show_default=True)
@click.option("--points-per-batch", type=click.IntRange(1), default=64, show_default=True)
@click.option("--pred-iou-thresh", type=float, default=None,
              help="Default: the family's own generator's (0.88; SAM 2: 0.8).")
@click.option("--stability-score-thresh", type=float, default=0.95, show_default=True)
@click.option("--stability-score-offset", type=float, default=1.0, show_default=True)
@click.option("--box-nms-thresh", type=float, default=0.7, show_default=True)
@click.option("--crop-n-layers", type=click.IntRange(0), default=0, show_default=True)
@click.option("--crop-nms-thresh", type=float, default=0.7, show_default=True)
@click.option("--crop-overlap-ratio", type=float, default=512 / 1500, show_default=True)
@click.option("--crop-n-points-downscale-factor", type=click.IntRange(1), default=1,
              show_default=True)
@click.option("--min-mask-region-area", type=click.IntRange(0), default=0, show_default=True,
              help="Fill holes and drop islands smaller than this (needs scipy).")
@click.option("--multimask-output/--single-mask-output", default=True, show_default=True,
              help="Three masks per point, or the single one (SAM 2's generator option).")
@click.option("--use-m2m", is_flag=True,
              help="Refine every mask once with itself as the mask prompt (SAM 2's option).")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Processes (local engine) or Ray actors (ray engine) sharing the images, "
                   "each with its share of the CPU threads.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="ONNX Runtime threads per worker; 0: the cores shared among --workers.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
              show_default=True,
              help="local: this process or --workers processes; ray: Ray Data (pip install "
                   "'sam-onnx[ray]'), a local Ray unless --address.")
@click.option("--address", help="With --engine ray: the cluster to join (auto, "
                                "ray://host:port); default: start a local Ray.")
@_expected_errors("images finished before it keep their JSON and overlay and are in "
                  "manifest.jsonl and annotations.json; none is half-written; run the same "
                  "command again to go on")
def segment(inputs, encoder, decoder, out_dir, workers, threads, engine, address, providers,
            **generator) -> None:
    """Segment everything in each image (files, folders, globs, list files; URIs such as
    s3://bucket/images/ through pyarrow.fs, as Ray Data reads them): segment_anything's
    automatic mask generator on ONNX Runtime; best with a batched decoder (export
    --decoder-contract batched). Writes IMAGE.json and IMAGE.png per image, and
    manifest.jsonl and annotations.json (COCO) for the dataset; run again, it resumes: images
    done for the same bytes and graphs are skipped. Exit 0 only when no image failed."""
    from tqdm import tqdm

    from .tools.dataset import segment_dataset

    grid = generator["points_per_side"] ** 2
    with tqdm(unit="image", disable=None) as bar, \
            tqdm(total=grid, unit="prompt", leave=False, disable=None if workers == 1 else True) \
            as prompts:
        def on_batch(done, total):
            prompts.total = total
            prompts.n = done
            prompts.refresh()

        def on_image(record):
            bar.update(1)
            detail = {"done": f"{record.get('masks')} masks",
                      "failed": f"failed: {record.get('reason')}",
                      "skipped": "skipped: done before for the same image and graphs"}
            bar.write(f"{record['path']}: {detail[record['status']]}")
            prompts.n = 0

        summary = segment_dataset(inputs, out_dir, encoder, decoder, generator=generator,
                                  workers=workers, threads=threads, engine=engine,
                                  address=address,
                                  providers=_providers(providers),
                                  on_image=on_image, on_batch=on_batch)
    click.echo(f"segment: {summary.line()}; per image JSON and overlays, manifest.jsonl and "
               f"annotations.json in {out_dir}")
    if not summary.ok:
        click.echo(f"Error: {summary.count('failed')} image(s) failed (their reasons are above "
                   "and in manifest.jsonl); fix or remove them and run again: done images are "
                   "skipped", err=True)
        sys.exit(1)


@main.command()
@_model_option(required=True)
@_weights_options
@_compared_graphs_options
@click.option("--decoder-contract", type=click.Choice(EXPORTED_DECODERS), default="official",
              show_default=True, help="With --export-to: the decoder to export.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="Repeatable; by default three synthetic images of different shapes.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32",
              show_default=True, help="The tolerances to hold the graphs to (with --export-to, "
              "also the variant exported).")
@click.option("--providers", default="cpu", show_default=True)
@click.option("--automatic/--no-automatic", default=True, show_default=True,
              help="Also compare automatic masks, record by record, on the first image (with a "
              "batched decoder; PyTorch's generator runs its encoder again: 19 s for vit_b here).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown"]),
              default="text", show_default=True)
@_expected_errors()
def check(model_type, checkpoint, random_weights, encoder, decoder, export_to, decoder_contract,
          images, precision, providers, automatic, fmt) -> None:
    """Compare ONNX graphs with segment_anything in PyTorch: embeddings, logits, scores and
    masks per image and prompt. Exit 0 when every comparison is within tolerance, else 1."""
    from .tools.check import check as run_check

    _require_graphs(encoder, decoder, export_to)
    report = run_check(model_type, checkpoint, random_weights=random_weights, encoder=encoder,
                       decoder=decoder, export_to=export_to, decoder_contract=decoder_contract,
                       images=images, precision=precision, providers=_providers(providers),
                       automatic=automatic)
    click.echo(report.render(fmt))
    if not report.passed:
        sys.exit(1)


@main.command()
@_model_option(required=True)
@_weights_options
@_compared_graphs_options
@click.option("--image", type=click.Path(path_type=Path),
              help="By default a synthetic image of --size.")
@click.option("--size", default="1024x1024", show_default=True,
              help="HxW of the synthetic image when no --image is given.")
@click.option("--providers", default="cuda,cpu", show_default=True,
              help="ONNX Runtime providers, each measured on its own.")
@click.option("--repeat", type=click.IntRange(1), default=3, show_default=True)
@click.option("--automatic/--no-automatic", default=True, show_default=True,
              help="Also time automatic mask generation.")
@click.option("--points-per-side", type=click.IntRange(1), default=32, show_default=True)
@click.option("--peers", default="", metavar="NAMES",
              help="Also other tools' graphs, made by their own code and run their way: "
              "official (segment-anything's export script and notebook), samexporter. Made "
              "once into a peers/ folder beside --encoder.")
@click.option("--rounds", type=click.IntRange(1), default=1, show_default=True,
              help="Run every pipeline this many times, in turns (a fresh process each).")
@click.option("--out", "markdown", type=click.Path(path_type=Path),
              help="Write the Markdown table here.")
@click.option("--json", "json_path", type=click.Path(path_type=Path),
              help="Write every number and the environment as JSON here.")
@click.option("--plot", type=click.Path(path_type=Path),
              help="Write a bar chart PNG here (needs matplotlib).")
@_expected_errors()
def bench(model_type, checkpoint, random_weights, encoder, decoder, export_to, image, size,
          providers, repeat, automatic, points_per_side, peers, rounds, markdown, json_path,
          plot) -> None:
    """PyTorch, ONNX Runtime and (--peers) other tools' graphs side by side: start-up,
    encoder, one prompt, automatic masks, peak RSS, and each pipeline's masks against
    PyTorch's; medians of repeated runs, each pipeline in a fresh process. A batched decoder
    (what --export-to writes) makes the automatic-mask row fast."""
    from .core.files import check_output
    from .tools import peers as peers_
    from .tools.bench import BenchConfig, write_outputs
    from .tools.bench import bench as run_bench

    _require_graphs(encoder, decoder, export_to)
    chosen = tuple(p.name for p in peers_.parse(peers))
    hw = _floats(size.replace("x", ","), (2,), "--size")
    for option, path in (("--out", markdown), ("--json", json_path), ("--plot", plot)):
        if path is not None:  # before minutes of measuring
            check_output(path, option, [p for p in (image, encoder, decoder, checkpoint) if p])
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SamOnnxError("--plot needs matplotlib: pip install 'sam-onnx[plot]'") from None
    if export_to is not None:
        from .exporter.run import export

        result = export(model_type, checkpoint, random_weights=random_weights, out_dir=export_to,
                        decoder_contract="batched")
        encoder, decoder = result.graph("encoder").path, result.graph("decoder").path
    cfg = BenchConfig(model_type, checkpoint, random_weights, encoder, decoder, image,
                      (int(hw[0]), int(hw[1])), repeat, automatic=automatic,
                      points_per_side=points_per_side, peers=chosen, rounds=rounds)
    report = run_bench(cfg, _providers(providers), log=lambda m: click.echo(m, err=True))
    click.echo(report.markdown())
    for path in write_outputs(report, markdown, json_path, plot):
        click.echo(f"wrote {path}", err=True)


if __name__ == "__main__":
    main()
