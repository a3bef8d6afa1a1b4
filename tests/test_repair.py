"""Every repair pass, before and after, on graphs from small exports."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_cli, static_points

import sam_onnx
from sam_onnx import backend
from sam_onnx.core.errors import SamOnnxError
from sam_onnx.families.sam.contracts import (
    DECODER_BATCHED,
    DECODER_LOWRES,
    DECODER_OFFICIAL,
)
from sam_onnx.graph import feeds, metadata, passes
from sam_onnx.graph.passes import keep_outputs
from sam_onnx.tools.repair import repair


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """An official and a lowres decoder with the same random weights."""
    out = tmp_path_factory.mktemp("decoders")
    for contract in ("official", "lowres"):
        sam_onnx.export("tiny", random_weights=True, out_dir=out, encoder=False,
                        decoder_contract=contract, isolate=False)
    return {"official": out / "tiny_decoder_official.onnx",
            "lowres": out / "tiny_decoder_lowres.onnx"}


def _broken(src, tmp_path, change, name="broken.onnx"):
    model = onnx.load(str(src))
    change(model)
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def _rename_input(old, new):
    def change(model):
        for value in model.graph.input:
            if value.name == old:
                value.name = new
        for node in model.graph.node:
            node.input[:] = [new if i == old else i for i in node.input]
    return change


def _run(path, arrays):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return dict(zip([o.name for o in session.get_outputs()],
                    session.run(None, {n: arrays[n] for n in names})))


def _prompt(size=(534, 800), has_mask=1.0, seed=0):
    rng = np.random.default_rng(seed)
    arrays = feeds.example_arrays(DECODER_OFFICIAL)
    arrays["image_embeddings"] = rng.standard_normal((1, 256, 64, 64)).astype(np.float32)
    arrays["point_coords"] = np.array([[[500.0, 300.0], [0.0, 0.0]]], np.float32)
    arrays["mask_input"] = (rng.standard_normal((1, 1, 256, 256)) * has_mask).astype(np.float32)
    arrays["has_mask_input"][:] = has_mask
    arrays["orig_im_size"] = np.array(size, np.float32)
    return arrays


def test_rename(decoders, tmp_path):
    broken = _broken(decoders["official"], tmp_path, _rename_input("point_labels", "labels"))
    assert not sam_onnx.validate(broken, feed="official").ok
    result = repair(broken, tmp_path / "fixed.onnx", rename={"labels": "point_labels"})
    assert result.changes == ["rename: renamed labels to point_labels"]
    assert sam_onnx.validate(result.output, feed="official").ok
    assert result.parity.passed and result.parity.worst.max_abs_err == 0.0


def test_dynamic_points(decoders, tmp_path):
    broken = _broken(decoders["official"], tmp_path, static_points(5))
    assert "SAM024" in sam_onnx.validate(broken, feed="official").codes()
    result = repair(broken, tmp_path / "fixed.onnx", dynamic_points=True)
    assert sam_onnx.validate(result.output, feed="official").ok
    assert result.parity.passed


def test_drop_initializer_inputs(decoders, tmp_path):
    def old_exporter(model):
        init = model.graph.initializer[0]
        model.graph.input.append(onnx.helper.make_tensor_value_info(
            init.name, init.data_type, list(init.dims)))

    broken = _broken(decoders["official"], tmp_path, old_exporter)
    assert "SAM026" in sam_onnx.validate(broken).codes()
    result = repair(broken, tmp_path / "fixed.onnx", drop_initializer_inputs=True)
    assert "SAM026" not in sam_onnx.validate(result.output).codes() and result.parity.passed


def test_lower_ir_version(decoders, tmp_path):
    max_ir, _ = backend.runtime_limits()

    def bump(model):
        model.ir_version = max_ir + 1

    broken = _broken(decoders["official"], tmp_path, bump)
    assert "SAM010" in sam_onnx.validate(broken).codes()
    proc = run_cli("repair", broken, "-o", tmp_path / "fixed.onnx", "--ir-version", max_ir)
    assert proc.returncode == 0, proc.stderr
    assert onnx.load(str(tmp_path / "fixed.onnx")).ir_version == max_ir
    assert "outputs not compared" in proc.stdout  # the runtime cannot load the original


def test_convert_opset(decoders, tmp_path):
    result = repair(decoders["official"], tmp_path / "op17.onnx", opset=17)
    model = onnx.load(str(result.output))
    assert [o.version for o in model.opset_import if o.domain == ""] == [17]
    assert result.parity.passed


def test_to_and_from_external_data(decoders, tmp_path):
    external = repair(decoders["official"], tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 10_000_000
    assert (tmp_path / "ext.onnx").stat().st_size < 1_000_000 and external.parity.passed
    inline = repair(tmp_path / "ext.onnx", tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists() and inline.parity.passed


def test_simplify(decoders, tmp_path):
    result = repair(decoders["official"], tmp_path / "simple.onnx", simplify=True)
    assert result.parity.passed
    assert len(onnx.load(str(result.output)).graph.node) <= \
        len(onnx.load(str(decoders["official"])).graph.node)


def test_fp16_keeps_float32_inputs_and_outputs(decoders, tmp_path):
    result = repair(decoders["official"], tmp_path / "fp16.onnx", fp16=True)
    model = onnx.load(str(result.output))
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert result.parity.precision == "fp16" and result.parity.passed
    assert sam_onnx.validate(result.output, feed="official").ok


def test_lowres_to_official_matches_the_exported_official_decoder(decoders, tmp_path):
    result = repair(decoders["lowres"], tmp_path / "official.onnx", contract="official")
    assert metadata.read(onnx.load(str(result.output)))["contract"] == "official"
    for size, has_mask in (((534, 800), 1.0), ((100, 3000), 0.0)):
        arrays = _prompt(size, has_mask)
        got, want = _run(result.output, arrays), _run(decoders["official"], arrays)
        assert got["masks"].shape == (1, 4, *size)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=1e-5)


def test_official_to_lowres_matches_the_exported_lowres_decoder(decoders, tmp_path):
    result = repair(decoders["official"], tmp_path / "lowres.onnx", contract="lowres")
    assert sam_onnx.validate(result.output, feed="lowres").ok
    for has_mask in (1.0, 0.0):
        arrays = _prompt(has_mask=has_mask)
        got, want = _run(result.output, arrays), _run(decoders["lowres"], arrays)
        assert set(got) == set(DECODER_LOWRES.output_names)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=1e-5)


def test_auto_makes_a_four_input_graph_take_the_official_feed(decoders, tmp_path):
    def renamed_and_static(model):
        _rename_input("point_coords", "point_coord")(model)
        static_points(3, ("point_coord", "point_labels"))(model)

    broken = _broken(decoders["lowres"], tmp_path, renamed_and_static)
    proc = run_cli("repair", broken, "-o", tmp_path / "auto.onnx", "--auto", "--feed", "official")
    assert proc.returncode == 0, proc.stderr
    assert "renamed point_coord to point_coords" in proc.stdout
    assert "to_official" in proc.stdout and "num_points" in proc.stdout
    report = sam_onnx.validate(tmp_path / "auto.onnx", feed="official", run=True)
    assert report.ok and "matches the official contract" in report.to_text()


def test_the_input_is_never_overwritten_unless_in_place(decoders, tmp_path):
    src = tmp_path / "d.onnx"
    src.write_bytes(decoders["official"].read_bytes())
    proc = run_cli("repair", src, "-o", src, "--opset", "17")
    assert proc.returncode == 1 and "--in-place" in proc.stderr
    before = src.read_bytes()
    proc = run_cli("repair", src, "--in-place", "--opset", "17")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "d.onnx.bak").read_bytes() == before and src.read_bytes() != before


def test_a_failed_repair_writes_nothing(decoders, tmp_path):
    with pytest.raises(SamOnnxError, match="only an official decoder"):
        repair(decoders["lowres"], tmp_path / "out.onnx", contract="lowres")
    with pytest.raises(SamOnnxError, match="no input or output nope"):
        repair(decoders["official"], tmp_path / "out.onnx", rename={"nope": "x"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, words", [
    ([], "nothing to repair"),
    (["--rename", "broken"], "use OLD=NEW"),
    (["--auto"], "--auto needs --feed"),
    (["--contract", "batched"], "can be adapted to the batched contract"),
])
def test_bad_repair_arguments(decoders, tmp_path, args, words):
    proc = run_cli("repair", decoders["official"], "-o", tmp_path / "o.onnx", *args)
    assert proc.returncode in (1, 2) and words in proc.stderr and "Traceback" not in proc.stderr


def test_repair_reports_in_json_free_text(decoders, tmp_path):
    proc = run_cli("repair", decoders["lowres"], "-o", tmp_path / "o.onnx", "--contract",
                   "official")
    assert proc.returncode == 0 and "parity" in proc.stdout
    assert json.loads(run_cli("validate", tmp_path / "o.onnx", "--format", "json").stdout)["ok"]


def test_auto_makes_a_fixed_batch_batched_decoder_take_any_prompt_count(tiny_batched,
                                                                        tmp_path):
    """A batched decoder exported for one batch size (16 prompts of 2 points), as other tools
    write them: validate says so for the batched feed, --auto makes both axes symbolic."""
    def fix_batch(model):
        for value in model.graph.input:
            if value.name in ("point_coords", "point_labels"):
                value.type.tensor_type.shape.dim[0].dim_value = 16
                value.type.tensor_type.shape.dim[1].dim_value = 2

    broken = _broken(tiny_batched, tmp_path, fix_batch)
    assert not sam_onnx.validate(broken, feed="batched").ok
    result = repair(broken, tmp_path / "fixed.onnx", auto_feed="batched")
    assert any("num_prompts" in c for c in result.changes)
    assert any("num_points" in c for c in result.changes)
    assert sam_onnx.validate(tmp_path / "fixed.onnx", feed="batched", run=True).ok
    assert metadata.read(onnx.load(str(tmp_path / "fixed.onnx")))["contract"] == "batched"


def _unfiltered(model):
    """The batched decoder as it was before pred_iou_thresh (and as other tools export
    many-prompt decoders): three inputs, every prompt's masks."""
    g = model.graph
    g.initializer.append(onnx.helper.make_tensor("every_prompt", onnx.TensorProto.FLOAT,
                                                 [1], [-np.inf]))
    for node in g.node:
        node.input[:] = ["every_prompt" if i == "pred_iou_thresh" else i for i in node.input]
    g.input.remove(next(v for v in g.input if v.name == "pred_iou_thresh"))
    pruned = keep_outputs(model, ["low_res_masks", "iou_predictions"])
    model.CopyFrom(pruned)
    metadata.write(model, {})


def test_auto_gives_an_unfiltered_many_prompt_decoder_the_batched_contract(tiny_batched,
                                                                          tmp_path):
    old = _broken(tiny_batched, tmp_path, _unfiltered)
    report = sam_onnx.validate(old, feed="batched")
    assert any("pred_iou_thresh" in f.message for f in report.errors), report.findings
    proc = run_cli("repair", old, "-o", tmp_path / "fixed.onnx", "--auto", "--feed", "batched")
    assert proc.returncode == 0, proc.stderr
    assert "to_batched" in proc.stdout and "parity" in proc.stdout
    assert sam_onnx.validate(tmp_path / "fixed.onnx", feed="batched", run=True).ok
    assert metadata.read(onnx.load(str(tmp_path / "fixed.onnx")))["contract"] == "batched"
    # the repaired graph picks the same prompts and masks as an exported batched decoder
    feed = feeds.example_arrays(DECODER_BATCHED)
    rng = np.random.default_rng(0)
    feed["image_embeddings"] = rng.standard_normal(feed["image_embeddings"].shape,
                                                   dtype=np.float32)
    feed["point_coords"] = rng.uniform(0, 1024, (6, 2, 2)).astype(np.float32)
    feed["point_labels"] = np.tile(np.array([[1.0, -1.0]], np.float32), (6, 1))
    exported = ort.InferenceSession(str(tiny_batched), providers=["CPUExecutionProvider"])
    fixed = ort.InferenceSession(str(tmp_path / "fixed.onnx"),
                                 providers=["CPUExecutionProvider"])
    iou = exported.run(["iou_predictions"], {**feed, "pred_iou_thresh":
                                             np.array([-np.inf], np.float32)})[0]
    feed["pred_iou_thresh"] = np.array([np.median(iou.max(axis=1))], np.float32)
    want, got = exported.run(None, feed), fixed.run(None, feed)
    assert 0 < len(got[2]) < 6
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_official_to_lowres_and_back_equals_the_original(decoders, tmp_path):
    """The documented round trip: official -> lowres -> official gives the original's
    outputs (has_mask_input becomes an input again; the masks upscaled at any size)."""
    lowres = repair(decoders["official"], tmp_path / "lowres.onnx", contract="lowres").output
    back = repair(lowres, tmp_path / "official.onnx", contract="official").output
    assert metadata.read(onnx.load(str(back)))["contract"] == "official"
    for size, has_mask in (((534, 800), 1.0), ((1800, 1200), 0.0)):
        arrays = _prompt(size, has_mask)
        got, want = _run(back, arrays), _run(decoders["official"], arrays)
        for name in DECODER_OFFICIAL.output_names:
            np.testing.assert_allclose(got[name], want[name], atol=1e-4)


def _selected(arrays, outputs):
    """segment-anything's select_masks on all four masks, in numpy: the single-mask token
    with three or more points, else the best of the other three."""
    n = arrays["point_coords"].shape[1]
    score = outputs["iou_predictions"] + (n - 2.5) * np.array([[1000.0, 0, 0, 0]])
    best = int(np.argmax(score[0]))
    return {k: v[:, best:best + 1] for k, v in outputs.items()}


def test_every_conversion_is_offered_on_the_command_line():
    from sam_onnx.families import CONVERTIBLE

    assert set(passes.CONTRACT_CONVERSIONS) == set(CONVERTIBLE)


def test_official_to_single_mask_and_back(decoders, tmp_path):
    single = repair(decoders["official"], tmp_path / "single.onnx",
                    contract="official_single").output
    assert metadata.read(onnx.load(str(single)))["contract"] == "official_single"
    assert sam_onnx.validate(single, feed="official", run=True).ok
    four = run_cli("repair", single, "-o", tmp_path / "four.onnx", "--contract", "official")
    assert four.returncode == 0, four.stderr
    for points in ([[500.0, 300.0], [0.0, 0.0]], [[500.0, 300.0], [90, 80], [0.0, 0.0]]):
        arrays = _prompt((1800, 1200), 0.0)
        arrays["point_coords"] = np.array([points], np.float32)
        arrays["point_labels"] = np.array([[1.0] * (len(points) - 1) + [-1.0]], np.float32)
        want = _run(decoders["official"], arrays)
        got = _run(single, arrays)
        assert got["masks"].shape == (1, 1, 1800, 1200) and got["low_res_masks"].shape[1] == 1
        for name, value in _selected(arrays, want).items():
            np.testing.assert_allclose(got[name], value, atol=1e-5)
        back = _run(tmp_path / "four.onnx", arrays)
        for name in DECODER_OFFICIAL.output_names:
            np.testing.assert_allclose(back[name], want[name], atol=1e-5)


def test_split_at_inputs_computes_the_image_part_once_and_the_rest_from_it():
    """What depends on the image alone (constants folded in) becomes its own graph; the rest
    takes its results; run one after the other they answer as the whole graph. Random ops
    stay in the rest (they must differ run to run), and a graph with nothing to split off
    is left whole."""
    from onnx import TensorProto, helper, numpy_helper

    def model(nodes, outputs):
        graph = helper.make_graph(
            nodes, "g",
            [helper.make_tensor_value_info("image", TensorProto.FLOAT, [2, 3]),
             helper.make_tensor_value_info("prompt", TensorProto.FLOAT, [2, 3])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            [numpy_helper.from_array(np.full((2, 3), 2, np.float32), "two")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    whole = model([
        helper.make_node("Add", ["two", "two"], ["four"]),  # constants only
        helper.make_node("Mul", ["image", "four"], ["scaled"]),
        helper.make_node("Exp", ["scaled"], ["grown"]),
        helper.make_node("RandomNormalLike", ["image"], ["noise"]),
        helper.make_node("Add", ["grown", "prompt"], ["out"]),
        helper.make_node("Add", ["out", "noise"], ["noisy"]),
        helper.make_node("Mul", ["image", "prompt"], ["direct"]),
    ], ["out", "noisy", "direct"])
    image_part, rest = passes.split_at_inputs(whole, ["image"])
    assert [i.name for i in image_part.graph.input] == ["image"]
    assert [o.name for o in image_part.graph.output] == ["grown"]
    assert [i.name for i in rest.graph.input] == ["image", "prompt", "grown"]
    assert {n.op_type for n in rest.graph.node} == {"Add", "Mul", "RandomNormalLike"}
    feed = {"image": np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3),
            "prompt": np.ones((2, 3), np.float32)}

    def run(m, inputs, names):
        return ort.InferenceSession(m.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(names, inputs)

    (grown,) = run(image_part, {"image": feed["image"]}, ["grown"])
    out, direct = run(rest, {**feed, "grown": grown}, ["out", "direct"])
    want_out, want_direct = run(whole, feed, ["out", "direct"])
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(direct, want_direct)
    # the image meets the prompt at once: nothing to split off
    assert passes.split_at_inputs(model([helper.make_node("Add", ["image", "prompt"], ["out"])],
                                        ["out"]), ["image"]) is None
