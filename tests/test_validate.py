"""The validator against a corpus of broken graphs built from small exports."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_cli, static_points
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sam_onnx
from sam_onnx import backend
from sam_onnx.families.sam.contracts import DECODER_OFFICIAL
from sam_onnx.graph import feeds, metadata
from sam_onnx.graph import validate as validator
from sam_onnx.tools.validate import run_once


@pytest.fixture(scope="session")
def exported(tiny_export, tmp_path_factory):
    """Paths of a tiny encoder, official decoder and lowres decoder."""
    out, _ = tiny_export
    lowres_dir = tmp_path_factory.mktemp("lowres")
    sam_onnx.export("tiny", random_weights=True, out_dir=lowres_dir, encoder=False,
                    decoder_contract="lowres", isolate=False)
    return {"encoder": out / "tiny_encoder.onnx",
            "official": out / "tiny_decoder_official.onnx",
            "lowres": lowres_dir / "tiny_decoder_lowres.onnx"}


def _mutated(path, tmp_path, change, name="broken.onnx"):
    model = onnx.load(str(path))
    change(model)
    out = tmp_path / name
    onnx.save(model, str(out))
    return out


def _codes(report):
    return [f.code for f in report.findings]


def test_a_clean_export_matches_its_contract(exported):
    for contract, path in (("encoder", exported["encoder"]), ("official", exported["official"]),
                           ("lowres", exported["lowres"])):
        report = sam_onnx.validate(path, feed=contract if contract != "encoder" else None)
        assert report.ok, report.to_text()
        assert [f.message for f in report.findings if f.code == "SAM030"] == [
            f"matches the {contract} contract"]


def test_the_seeds_failure_four_input_decoder_fed_six_keys(exported):
    proc = run_cli("validate", exported["lowres"], "--feed", "official", "--format", "json")
    assert proc.returncode == 1
    found = json.loads(proc.stdout)["findings"]
    extra = [f for f in found if f["code"] == "SAM021"]
    assert sorted(f["actual"] for f in extra) == ["has_mask_input", "orig_im_size"]
    assert all(f["ort_error"].startswith("Invalid input name") for f in extra)


def _point_label_renamed(model):
    for value in model.graph.input:
        if value.name == "point_labels":
            value.name = "point_label"
    for node in model.graph.node:
        node.input[:] = ["point_label" if i == "point_labels" else i for i in node.input]


def test_renamed_inputs_are_reported_with_the_near_miss(exported, tmp_path):
    path = _mutated(exported["official"], tmp_path, _point_label_renamed)
    report = sam_onnx.validate(path, feed="official")
    assert "SAM020" in _codes(report) and "SAM021" in _codes(report)
    unexpected = next(f for f in report.findings if f.code == "SAM021")
    assert "did you mean point_label?" in unexpected.message
    # the recorded contract no longer holds, and the nearest contract says how far it is
    assert "SAM032" in _codes(report) and "SAM031" in _codes(report)


def test_a_static_num_points_rejects_another_point_count(exported, tmp_path):
    path = _mutated(exported["official"], tmp_path, static_points(5))
    report = sam_onnx.validate(path, feed="official")
    dims = [f for f in report.findings if f.code == "SAM024"]
    assert {f.target for f in dims} == {"input:point_coords", "input:point_labels"}
    assert dims[0].ort_error.startswith("Got invalid dimensions for input: point_coords")


def test_float64_int64_and_scalar_feeds_are_all_reported_at_once(exported):
    arrays = feeds.example_arrays(DECODER_OFFICIAL)
    arrays["point_coords"] = arrays["point_coords"].astype(np.float64)
    arrays["point_labels"] = np.array([[1, -1]])  # int64 from plain numpy
    arrays["has_mask_input"] = 0.0  # a bare Python float
    report = sam_onnx.validate(exported["official"], feed=arrays)
    targets = {(f.code, f.target) for f in report.errors}
    assert targets == {("SAM022", "input:point_coords"), ("SAM022", "input:point_labels"),
                       ("SAM022", "input:has_mask_input"), ("SAM023", "input:has_mask_input")}
    rank = next(f for f in report.findings if f.code == "SAM023")
    assert "bare scalar" in rank.message and rank.ort_error.startswith("Invalid rank for input")


def test_inconsistent_symbolic_dims_are_a_warning(exported):
    arrays = feeds.example_arrays(DECODER_OFFICIAL)
    arrays["point_labels"] = np.ones((1, 3), np.float32)
    report = sam_onnx.validate(exported["official"], feed=arrays)
    assert report.ok and "SAM025" in _codes(report)


def test_ir_version_above_the_runtimes(exported, tmp_path):
    max_ir, _ = backend.runtime_limits()

    def bump(model):
        model.ir_version = max_ir + 1

    path = tmp_path / "new_ir.onnx"
    model = onnx.load(str(exported["official"]))
    bump(model)
    path.write_bytes(model.SerializeToString())  # onnx.save would refuse nothing; be explicit
    report = sam_onnx.validate(path)
    finding = next(f for f in report.findings if f.code == "SAM010")
    assert finding.ort_error == f"Unsupported model IR version: {max_ir + 1}, max supported IR " \
                                f"version: {max_ir}"
    assert f"--ir-version {max_ir}" in finding.fix


def test_initializers_listed_as_inputs_are_optional_and_unused_inputs_flagged(exported,
                                                                           tmp_path):
    def old_exporter(model):
        model.graph.input.append(onnx.helper.make_tensor_value_info(
            model.graph.initializer[0].name, model.graph.initializer[0].data_type,
            list(model.graph.initializer[0].dims)))
        model.graph.input.append(onnx.helper.make_tensor_value_info(
            "dummy", onnx.TensorProto.FLOAT, [1]))

    path = _mutated(exported["official"], tmp_path, old_exporter)
    report = sam_onnx.validate(path, feed="official")
    assert "SAM026" in _codes(report) and "SAM027" in _codes(report)
    missing = [f.target for f in report.findings if f.code == "SAM020"]
    assert missing == ["input:dummy"]  # the initializer is not demanded


def test_missing_and_short_external_data(exported, tmp_path):
    for name in ("tiny_encoder.onnx",):
        shutil.copy(exported["encoder"], tmp_path / name)
    report = sam_onnx.validate(tmp_path / "tiny_encoder.onnx")
    finding = next(f for f in report.findings if f.code == "SAM005")
    assert "tiny_encoder.onnx.data" in finding.message
    data = exported["encoder"].with_name("tiny_encoder.onnx.data").read_bytes()
    (tmp_path / "tiny_encoder.onnx.data").write_bytes(data[: len(data) // 2])
    assert "SAM006" in _codes(sam_onnx.validate(tmp_path / "tiny_encoder.onnx"))


@pytest.mark.parametrize("kind, code, words", [
    ("truncated", "SAM004", "truncated"),
    ("empty", "SAM002", "empty"),
    ("random", "SAM003", "not an ONNX model"),
    ("checkpoint", "SAM003", "zip archive"),
    ("missing", "SAM001", "does not exist"),
])
def test_unreadable_files_get_their_own_finding_and_exit_2(exported, tiny_checkpoint, tmp_path,
                                                           kind, code, words):
    path = tmp_path / f"{kind}.onnx"
    data = exported["official"].read_bytes()
    content = {"truncated": data[: len(data) // 3], "empty": b"",
               "random": np.random.default_rng(0).bytes(5000),
               "checkpoint": tiny_checkpoint.read_bytes()[:5000], "missing": None}[kind]
    if content is not None:
        path.write_bytes(content)
    report = sam_onnx.validate(path)
    assert _codes(report) == [code] and words in report.findings[0].message
    proc = run_cli("validate", path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and code in proc.stdout


def test_run_reports_non_finite_outputs(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Log", ["x"], ["y"])], "g", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "log.onnx"))
    report = sam_onnx.validate(tmp_path / "log.onnx", feed={"x": np.array([-1.0, 1.0], "float32")},
                                run=True)
    finding = next(f for f in report.findings if f.code == "SAM041")
    assert finding.target == "output:y" and "1 NaN/Inf" in finding.message


def test_run_maps_onnx_runtime_errors_to_rules(exported):
    model = onnx.load(str(exported["official"]))
    bad = feeds.from_arrays({**feeds.example_arrays(DECODER_OFFICIAL),
                             "has_mask_input": np.zeros(1, np.float64)})
    report = run_once(exported["official"], model, bad, "official")
    assert _codes(report) == ["SAM022"]
    assert "Unexpected input data type" in report.findings[0].ort_error


def test_run_with_a_synthesized_feed_passes(exported):
    report = sam_onnx.validate(exported["official"], run=True)
    assert report.ok, report.to_text()


def test_json_and_npz_feeds(exported, tmp_path):
    desc = {k: {"dtype": str(v.dtype), "shape": list(v.shape)}
            for k, v in feeds.example_arrays(DECODER_OFFICIAL).items()}
    desc["orig_im_size"]["dtype"] = "int64"
    (tmp_path / "feed.json").write_text(json.dumps(desc))
    proc = run_cli("validate", exported["official"], "--feed", tmp_path / "feed.json")
    assert proc.returncode == 1 and "SAM022" in proc.stdout and "orig_im_size" in proc.stdout
    np.savez(tmp_path / "feed.npz", **feeds.example_arrays(DECODER_OFFICIAL))
    proc = run_cli("validate", exported["official"], "--feed", tmp_path / "feed.npz")
    assert proc.returncode == 0


def test_bad_feed_argument_exits_2_with_one_line(exported, tmp_path):
    proc = run_cli("validate", exported["official"], "--feed", "samexporter")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown feed 'samexporter'" in proc.stderr
    (tmp_path / "feed.json").write_text("{not json")
    proc = run_cli("validate", exported["official"], "--feed", tmp_path / "feed.json")
    assert proc.returncode == 2 and "cannot read feed description" in proc.stderr


def test_pairs_fit_and_mismatches(exported, tmp_path):
    proc = run_cli("validate", exported["official"], exported["encoder"])
    assert proc.returncode == 0 and "SAM035" in proc.stdout

    def other_model(model):
        record = metadata.read(model)
        record["model_type"] = "vit_b"
        metadata.write(model, record)
        model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 128

    path = _mutated(exported["official"], tmp_path, other_model)
    report = sam_onnx.validate_pair(onnx.load(str(exported["encoder"]), load_external_data=False),
                                     onnx.load(str(path)))
    assert set(_codes(report)) == {"SAM033", "SAM034"}


def test_github_format_prints_annotations(exported):
    proc = run_cli("validate", exported["lowres"], "--feed", "official", "--format", "github")
    lines = proc.stdout.splitlines()
    assert any(line.startswith("::error file=") and "SAM021" in line for line in lines)
    assert any(line.startswith("::notice ") for line in lines)


def _small_sam_like_model():
    """A few-node graph carrying SAM metadata: small enough that mutations hit structure."""
    h = onnx.helper
    inputs = [h.make_tensor_value_info(t.name, onnx.TensorProto.FLOAT, list(t.shape))
              for t in DECODER_OFFICIAL.inputs]
    out = h.make_tensor_value_info("iou_predictions", onnx.TensorProto.FLOAT, [1, 4])
    nodes = [h.make_node("ReduceMean", ["image_embeddings"], ["m"], keepdims=0),
             h.make_node("Add", ["m", "has_mask_input"], ["iou_predictions"])]
    model = h.make_model(h.make_graph(nodes, "g", inputs, [out]),
                         opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    metadata.write(model, metadata.provenance(
        DECODER_OFFICIAL, model_type="tiny", weights_source="random", weights_checksum="random",
        exporter="test", opset=17))
    return model.SerializeToString()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_model_bytes_never_raise(tmp_path, data):
    mutated = bytearray(_small_sam_like_model())
    for _ in range(data.draw(st.integers(1, 8))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    mutated = mutated[:data.draw(st.integers(1, len(mutated)))]
    path = tmp_path / "fuzz.onnx"
    path.write_bytes(bytes(mutated))
    report = sam_onnx.validate(path, feed="official")
    assert report.findings
    assert all(f.code in validator.RULES for f in report.findings)


@pytest.mark.parametrize("text", [b"point_coords", b"sam_onnx.contract_spec"])
def test_names_that_are_not_utf8_are_a_damaged_file(tmp_path, text):
    raw = _small_sam_like_model()
    assert text in raw
    path = tmp_path / "damaged.onnx"
    path.write_bytes(raw.replace(text, b"\x80" + text[1:]))
    report = sam_onnx.validate(path, feed="official")
    assert [f.code for f in report.findings] == [validator.FILE_TRUNCATED.code]
    assert "not UTF-8" in report.findings[0].message


def test_every_rule_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "validate-and-repair.md").read_text()
    for rule in validator.RULES.values():
        assert f"| `{rule.code}` | {rule.name} | {rule.severity} |" in doc


def _initializers_as_inputs(model):
    model.graph.input.extend(onnx.helper.make_tensor_value_info(
        i.name, i.data_type, list(i.dims)) for i in list(model.graph.initializer)[:3])


def _newer_ir(model):
    model.ir_version = backend.runtime_limits()[0] + 1


def _renamed_and_static(model):
    _point_label_renamed(model)
    static_points(3, ("point_coords", "point_label"))(model)


#: (case, graph, how it is broken, the feed it is validated with): every fix validate prints
#: for it that is a command is run as printed, and the result takes that feed.
FIX_CASES = [
    ("lowres fed the official feed", "lowres", None, "official"),
    ("official fed the lowres feed", "official", None, "lowres"),
    ("point axis fixed at 5", "official", static_points(5), "official"),
    ("initializers listed as inputs", "official", _initializers_as_inputs, "official"),
    ("IR version newer than the runtime's", "official", _newer_ir, "official"),
    ("a renamed input and a fixed point axis", "official", _renamed_and_static, "official"),
]


@pytest.mark.parametrize("case, graph, change, feed", FIX_CASES, ids=[c[0] for c in FIX_CASES])
def test_every_printed_fix_runs_as_printed_and_does_what_it_says(exported, tmp_path, case,
                                                                 graph, change, feed):
    import re
    import shlex

    path = tmp_path / "graph.onnx"
    model = onnx.load(str(exported[graph]))
    if change is not None:
        change(model)
    path.write_bytes(model.SerializeToString())
    report = sam_onnx.validate(path, feed=feed)
    commands = {(f.code, f.target, m.group(0).strip()) for f in report.findings
                for m in re.finditer(r"sam-onnx repair [^;()]*", f.fix)}
    assert commands, report.to_text()
    for code, target, command in commands:
        args = shlex.split(command)[1:]
        assert str(path) in args and args[args.index("-o") + 1] != str(path)
        proc = run_cli(*args)
        assert proc.returncode == 0, f"{command}: {proc.stderr}"
        out = Path(args[args.index("-o") + 1])
        fixed = sam_onnx.validate(out, feed=feed, run=True)
        # the finding the command was printed for is gone; --auto fixes everything
        assert (code, target) not in {(f.code, f.target) for f in fixed.findings}, command
        if "--auto" in args:
            assert fixed.ok, f"{command}:\n{fixed.to_text()}"
        out.unlink()


def test_a_lowres_decoder_fed_the_official_feed_is_never_told_to_rename_mask_input(exported):
    report = sam_onnx.validate(exported["lowres"], feed="official")
    fixes = " ".join(f.fix for f in report.findings)
    assert "mask_input=has_mask_input" not in fixes
    assert "--auto --feed official" in fixes


def test_fix_texts_for_the_encoders_name_the_form_that_takes_what_was_fed(exported):
    image = np.zeros((683, 1024, 3), np.float32)
    rank = next(f for f in sam_onnx.validate(exported["encoder"], feed={"image": image}).findings
                if f.code == "SAM023")
    assert "--encoder-contract image" in rank.fix and "reshape" not in rank.fix
    arrays = feeds.example_arrays(DECODER_OFFICIAL)
    arrays["mask_input"] = np.zeros((1, 4, 256, 256), np.float32)  # low_res_masks fed back
    dim = next(f for f in sam_onnx.validate(exported["official"], feed=arrays).findings
               if f.code == "SAM024")
    assert "low_res_masks[:, i:i+1]" in dim.fix and "--return-single-mask" in dim.fix
