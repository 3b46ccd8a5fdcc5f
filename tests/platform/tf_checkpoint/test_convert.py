"""The deeplab2 checkpoint importer without TensorFlow, on tensor bundles fabricated byte by byte.

`write_bundle` writes the format TensorFlow's tensor-bundle writer produces (a LevelDB table of
BundleEntryProto + a raw data file), so the reader and the refusal path are tested on real files.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from maxdeeplab.cli.main import main as cli_main
from maxdeeplab.models.config import ModelConfig, variant_overrides
from maxdeeplab.models.network import build_model
from maxdeeplab.platform.errors import DataError
from maxdeeplab.platform.tf_checkpoint.bundle import TensorBundle, snappy_decompress
from maxdeeplab.platform.tf_checkpoint.convert import (
    CheckpointMappingError,
    convert_tensor,
    import_checkpoint,
    map_variables,
    model_shapes,
    torch_name,
)

SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
TF_DTYPES = {np.dtype("float32"): 1, np.dtype("int64"): 9}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _snappy_literals(data: bytes) -> bytes:
    """A valid Snappy block made of literals only (2-byte length form)."""
    out = bytearray(_varint(len(data)))
    for start in range(0, len(data), 65536):
        chunk = data[start : start + 65536]
        out += bytes([61 << 2]) + (len(chunk) - 1).to_bytes(2, "little") + chunk
    return bytes(out)


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    """Prefix-compressed entries, one restart point."""
    out, previous = bytearray(), b""
    for key, value in entries:
        shared = 0
        while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
            shared += 1
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
        out += key[shared:] + value
        previous = key
    return bytes(out) + struct.pack("<II", 0, 1)


def write_bundle(
    prefix: Path,
    tensors: dict[str, np.ndarray],
    *,
    strings: tuple[str, ...] = (),
    compress: bool = False,
) -> None:
    """Write `prefix.index` + `prefix.data-00000-of-00001` holding `tensors` (and empty strings)."""
    data, entries = bytearray(), []
    for key in sorted([*tensors, *strings]):
        if key in strings:
            proto = _field(1, 7)  # DT_STRING, scalar
        else:
            array = np.ascontiguousarray(tensors[key])
            shape = b"".join(_field(2, _field(1, d)) for d in array.shape)
            proto = _field(1, TF_DTYPES[array.dtype]) + _field(2, shape)
            proto += _field(4, len(data)) + _field(5, array.nbytes)
            data += array.tobytes()
        entries.append((key.encode(), proto))
    header = (b"", _field(1, 1))  # BundleHeaderProto: one shard, little-endian
    block = _block([header, *entries])
    kind = 0
    if compress:
        block, kind = _snappy_literals(block), 1
    table = bytearray(block + bytes([kind]) + b"\0\0\0\0")
    index = _block([(b"\xff", _varint(0) + _varint(len(block)))])
    index_offset = len(table)
    table += index + b"\0" * 5
    handles = _varint(0) + _varint(0) + _varint(index_offset) + _varint(len(index))
    table += handles.ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    Path(f"{prefix}.index").write_bytes(table)
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))


@pytest.mark.parametrize("compress", [False, True])
def test_bundle_round_trip(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    tensors = {
        f"encoder/_stem/_conv1_bn_act/_conv/kernel{SUFFIX}": rng.normal(size=(3, 3, 3, 8)).astype(
            np.float32
        ),
        f"encoder/memory_feature{SUFFIX}": rng.normal(size=(1, 4, 6)).astype(np.float32),
        f"global_step{SUFFIX}": np.array(7, dtype=np.int64),
    }
    write_bundle(
        tmp_path / "ckpt", tensors, strings=("_CHECKPOINTABLE_OBJECT_GRAPH",), compress=compress
    )
    bundle = TensorBundle(tmp_path / "ckpt.index")
    assert set(bundle.shapes()) == set(tensors)
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" in bundle.entries
    for key, value in tensors.items():
        assert bundle.read(key).dtype == value.dtype
        np.testing.assert_array_equal(bundle.read(key), value)
    with pytest.raises(DataError, match="no tensor"):
        bundle.read("nope")
    with pytest.raises(DataError, match="string or partitioned"):
        bundle.read("_CHECKPOINTABLE_OBJECT_GRAPH")


def test_snappy_back_references() -> None:
    # "abc" literal, then a 9-byte copy at offset 3 that overlaps its own output.
    block = _varint(12) + bytes([2 << 2]) + b"abc" + bytes([(9 - 4) << 2 | 1, 3])
    assert snappy_decompress(block) == b"abcabcabcabc"
    with pytest.raises(ValueError):
        snappy_decompress(_varint(5) + bytes([2 << 2]) + b"abc")


def test_missing_or_corrupt_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such checkpoint index"):
        TensorBundle(tmp_path / "absent")
    (tmp_path / "bad.index").write_bytes(b"\0" * 64)
    with pytest.raises(DataError, match="bad.index"):
        TensorBundle(tmp_path / "bad")


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("encoder/_stem/_conv1_bn_act/_conv/kernel", "encoder.stem.conv1_bn_act.conv.weight"),
        (
            "encoder/_stage5/_block1/_attention/_width_axis/_batch_norm_similarity/moving_variance",
            "encoder.stage5.block1.attention.width_axis.similarity_bn.running_var",
        ),
        (
            "encoder/_stage5/_block2/_attention/_height_axis/qkv_kernel",
            "encoder.stage5.block2.attention.height_axis.qkv.weight",
        ),
        (
            "encoder/_stage5_extra/_block1_transformer/_memory_attention/"
            "_batch_norm_retrieved_value/gamma",
            "encoder.stage5_extra.block1_transformer.memory_attention.retrieved_bn.weight",
        ),
        ("pixel_space_mask_batch_norm/beta", "mask_class_head.mask_logit_bn.bias"),
        ("transformer_class_head/_conv/bias", "mask_class_head.transformer_class_head.bias"),
        (
            "semantic_decoder/_aspp/_aspp_conv3/_conv_bn_act/_conv/kernel",
            "aux_semantic.aspp.aspp_convs.2.conv.weight",
        ),
        (
            "semantic_decoder/_aspp/_aspp_pool/_conv_bn_act/_batch_norm/gamma",
            "aux_semantic.aspp.pool_bn.weight",
        ),
        (
            "semantic_decoder/_fusion_conv2/_conv1_bn_act/_depthwise/_depthwise_conv/"
            "depthwise_kernel",
            "aux_semantic.fusion_convs.1.depthwise.weight",
        ),
        (
            "semantic_head_without_last_layer/_conv1_bn_act/_pointwise/_batch_norm/moving_mean",
            "aux_semantic.conv_block.pointwise.bn.running_mean",
        ),
        ("semantic_last_layer/kernel", "aux_semantic.final_conv.weight"),
    ],
)
def test_names_follow_the_table(key: str, name: str) -> None:
    assert torch_name(key) == name


def test_plain_checkpoint_keys_become_trainer_keys() -> None:
    shapes = {
        f"model/_decoder/_auxiliary_semantic_head/final_conv/bias{SUFFIX}": (134,),
        f"model/_encoder/memory_feature{SUFFIX}": (1, 128, 256),
        f"model/_decoder/_pixel_space_feature_batch_norm/gamma{SUFFIX}": (128,),
    }
    ours = {
        "aux_semantic.final_conv.bias": (134,),
        "encoder.memory_feature": (128, 256),
        "pixel_space_head.feature_bn.weight": (128,),
    }
    report = map_variables(shapes, ours)
    assert report.problems() == []


def test_kernel_layouts_compute_the_same_convolution() -> None:
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(1, 3, 7, 7)).astype(np.float32))
    hwio = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
    weight = torch.from_numpy(convert_tensor("a/_conv/kernel", hwio, (5, 3, 3, 3)).copy())
    ours = torch.nn.functional.conv2d(x, weight)
    patches = x.unfold(2, 3, 1).unfold(3, 3, 1)  # 1 x C x 5 x 5 x kh x kw
    theirs = torch.einsum("bcyxhw,hwco->boyx", patches, torch.from_numpy(hwio))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    dense = rng.normal(size=(4, 6)).astype(np.float32)  # in x out
    converted = convert_tensor("a/qkv_kernel", dense, (6, 4, 1, 1))
    np.testing.assert_array_equal(converted[:, :, 0, 0], dense.T)
    conv1d = rng.normal(size=(1, 4, 6)).astype(np.float32)
    np.testing.assert_array_equal(
        convert_tensor("a/_conv/kernel", conv1d, (6, 4, 1))[:, :, 0], conv1d[0].T
    )
    stacked = rng.normal(size=(3, 1, 8, 1, 1)).astype(np.float32)
    np.testing.assert_array_equal(
        convert_tensor("a/_batch_norm_similarity/gamma", stacked, (24,)), stacked.ravel()
    )


def _tiny_model() -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(ModelConfig(**variant_overrides("max_deeplab_tiny")))


def _bad_checkpoint(tmp_path: Path) -> tuple[Path, list[str]]:
    """A tiny-variant checkpoint with 1 good, 1 mis-shaped and 2 unknown variables + extras."""
    good = f"encoder/_stem/_conv1_bn_act/_conv/kernel{SUFFIX}"  # tiny stem: 3 -> 8 channels
    wrong = f"encoder/_stem/_conv2_bn_act/_conv/kernel{SUFFIX}"  # should be 3 x 3 x 8 x 8
    unknown = [
        f"encoder/_stage9/_block1/_conv1_bn_act/_conv/kernel{SUFFIX}",
        f"pixel_space_head/_bogus/kernel{SUFFIX}",
    ]
    tensors = {
        good: np.zeros((3, 3, 3, 8), np.float32),
        wrong: np.zeros((3, 3, 8, 9), np.float32),
        **{key: np.zeros((2, 2), np.float32) for key in unknown},
        # Not model weights: ignored, never reported.
        f"encoder/_stem/_conv1_bn_act/_conv/kernel/.OPTIMIZER_SLOT/optimizer/m{SUFFIX}": np.zeros(
            (3, 3, 3, 8), np.float32
        ),
        f"optimizer/iter{SUFFIX}": np.array(3, np.int64),
        f"save_counter{SUFFIX}": np.array(1, np.int64),
    }
    write_bundle(tmp_path / "ckpt", tensors, strings=("_CHECKPOINTABLE_OBJECT_GRAPH",))
    return tmp_path / "ckpt", [wrong, *unknown]


def test_refusal_lists_every_problem(tmp_path: Path) -> None:
    prefix, bad = _bad_checkpoint(tmp_path)
    model = _tiny_model()
    with pytest.raises(CheckpointMappingError) as caught:
        import_checkpoint(str(prefix), model)
    problems = caught.value.problems
    unmapped = [p for p in problems if p.startswith("unmapped")]
    mismatched = [p for p in problems if p.startswith("shape mismatch")]
    missing = [p for p in problems if p.startswith("not in the checkpoint")]
    assert sorted(p.split(": ", 1)[1].split(" (")[0] for p in unmapped) == sorted(bad[1:])
    assert len(mismatched) == 1 and bad[0] in mismatched[0] and "(8, 8, 3, 3)" in mismatched[0]
    # Everything of ours except the two stem kernels the checkpoint names is reported missing.
    expected_missing = set(model_shapes(model)) - {
        "encoder.stem.conv1_bn_act.conv.weight",
        "encoder.stem.conv2_bn_act.conv.weight",
    }
    assert {p.split(": ", 1)[1] for p in missing} == expected_missing
    assert len(problems) == 3 + len(expected_missing)
    assert "\n" not in str(caught.value)


def test_cli_prints_the_list_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix, bad = _bad_checkpoint(tmp_path)
    out = tmp_path / "model.pt"
    argv = ["import-tf", str(prefix), "--variant", "max_deeplab_tiny", "--out", str(out)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert all(key in err for key in bad)
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert not out.exists()


def test_backbone_checkpoint_needs_only_the_encoder(tmp_path: Path) -> None:
    model = _tiny_model()
    encoder = {n: s for n, s in model_shapes(model).items() if n.startswith("encoder.")}
    # A backbone checkpoint holding one encoder tensor: the rest of the encoder is missing, the
    # heads are not asked for.
    report = map_variables({f"encoder/memory_feature{SUFFIX}": (1, 32, 64)}, model_shapes(model))
    assert report.backbone_only
    assert set(report.missing) == set(encoder) - {"encoder.memory_feature"}
