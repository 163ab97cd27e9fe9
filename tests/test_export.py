"""medgan export: format round trips, DICOM validity and privacy, determinism, safety, and the downstream contracts
(medgan's slice-dataset reader, MONAI's decathlon datalist and a MONAI training loop over it)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medgan.config import Config, ModelConfig
from medgan.dataset import SliceDataset
from medgan.export import SEED_STRIDE, export_dataset, image_seed, read_image
from medgan.export.dicom import PATIENT_ID, PATIENT_NAME, SC_IMAGE_STORAGE, SYNTHETIC_MARKER, check_dicom
from medgan.export.formats import QUANTIZATION
from medgan.models.generator import CondBatchNorm, Generator, LoadedGenerator, generate

SPACING_MM = 1.5
N_PER_CLASS = 4
# Identifiers of the real volunteers in ../shared/data: nothing medgan writes may contain them.
REAL_IDENTIFIERS = (b"stc_test", b"crlab")


def tiny_loaded() -> LoadedGenerator:
    torch.manual_seed(0)
    G = Generator(num_classes=2, z_dim=16, width=8, max_channels=32, embed_dim=8)
    # Fresh CBN starts class-blind (zero gain weights); random class modulation makes the two classes differ, so the
    # downstream classifier below has something to learn.
    with torch.no_grad():
        for m in G.modules():
            if isinstance(m, CondBatchNorm):
                m.gain.weight.normal_(0, 0.3)
                m.bias.weight.normal_(0, 0.3)
        G.out.bias.zero_()  # keeps the output away from tanh saturation
    info = {
        "model_uri": "models:/medgan-demo/3",
        "name": "medgan-demo",
        "version": "3",
        "run_id": "0123abcd",
        "dataset_hash": "f" * 64,
        "spacing_mm": [SPACING_MM, SPACING_MM],
        # Not provenance: a DICOM must never carry stray info fields (these are the real volunteers' identifiers).
        "patient_hint": "stc_test",
        "PatientID": "crlab",
    }
    return LoadedGenerator(G, ["a", "b"], ModelConfig(z_dim=16, width=8, g_max_channels=32, embed_dim=8), info=info)


def make_cfg(fmt: str, n: int = N_PER_CLASS, **export) -> Config:
    cfg = Config()
    cfg.export.format, cfg.export.n_per_class, cfg.export.batch_size, cfg.export.device = fmt, n, 3, "cpu"
    for k, v in export.items():
        setattr(cfg.export, k, v)
    return cfg


@pytest.fixture(scope="module")
def loaded() -> LoadedGenerator:
    return tiny_loaded()


@pytest.fixture(scope="module")
def reference(loaded) -> dict[tuple[int, int], np.ndarray]:
    """The generator's own float32 output for every (label, index) the exports write."""
    out = {}
    for c in range(2):
        # Batched as the export batches (per class, batch_size 3): CPU kernels round differently per batch shape.
        imgs = generate(loaded.G, [c] * N_PER_CLASS, [image_seed(0, c, i) for i in range(N_PER_CLASS)], batch_size=3)
        out.update({(c, i): img for i, img in enumerate(imgs)})
    return out


@pytest.fixture(scope="module")
def exports(loaded, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    variants = {"png8": ("png", {}), "png16": ("png", {"png_bits": 16}), "npy": ("npy", {}),
                "nifti": ("nifti", {}), "dicom": ("dicom", {})}  # fmt: skip
    out = {}
    for name, (fmt, extra) in variants.items():
        res = export_dataset(loaded, make_cfg(fmt, **extra), root / name, progress=False)
        assert res.n_images == 2 * N_PER_CLASS and res.out == root / name
        out[name] = res.out
    return out


def manifest(path: Path) -> list[dict[str, str]]:
    with open(path / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def independent_read(path: Path) -> np.ndarray:
    """Read a file with its format's own library and the documented mapping (not medgan's reader)."""
    name = path.name
    if name.endswith(".png"):
        from PIL import Image

        with Image.open(path) as im:
            mode, q = im.mode, np.asarray(im).astype(np.float64)
        return q / 127.5 - 1 if mode == "L" else q / 32767.5 - 1
    if name.endswith(".npy"):
        return np.load(path).T  # stored x first: [column, row]
    if name.endswith(".nii.gz"):
        import nibabel as nib

        img = nib.load(path)
        assert np.allclose(img.affine, np.diag([-SPACING_MM, -SPACING_MM, SPACING_MM, 1.0]))
        assert img.header.get_zooms()[:2] == (SPACING_MM, SPACING_MM)
        assert img.get_data_dtype() == np.float32
        return np.asarray(img.dataobj).T
    if name.endswith(".dcm"):
        import pydicom

        ds = pydicom.dcmread(path)
        assert ds.pixel_array.dtype == np.uint16
        return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    raise AssertionError(name)


@pytest.mark.parametrize("variant", ["png8", "png16", "npy", "nifti", "dicom"])
def test_round_trip_within_documented_quantization(exports, reference, variant):
    out, tol = exports[variant], QUANTIZATION[variant] + 1e-6
    rows = manifest(out)
    assert len(rows) == 2 * N_PER_CLASS
    ds = SliceDataset.open(out)
    for k, row in enumerate(rows):
        label, seed = int(row["label"]), int(row["seed"])
        index = seed - label * SEED_STRIDE
        ref = reference[(label, index)][0]
        assert row["file"] == f"images/{'ab'[label]}/{index:05d}.{Path(row['file']).name.split('.', 1)[1]}"
        back = independent_read(out / row["file"])
        assert back.shape == (128, 128)
        assert np.abs(back - ref).max() <= tol, (variant, row["file"])
        assert np.abs(read_image(out / row["file"])[0] - ref).max() <= tol
        # The slice dataset holds the same image in float16.
        assert np.abs(ds.images[k, 0].astype(np.float32) - ref).max() <= 1e-3
    if variant in ("npy", "nifti"):
        row = rows[-1]
        assert np.array_equal(independent_read(out / row["file"]), reference[(1, N_PER_CLASS - 1)][0])
    assert float(np.std(ds.images.astype(np.float32))) > 0.02, "the test generator should draw varied pixels"


def test_dicom_files_are_valid_synthetic_and_free_of_real_identifiers(exports):
    import pydicom

    out = exports["dicom"]
    files = sorted((out / "images").rglob("*.dcm"))
    assert len(files) == 2 * N_PER_CLASS
    series, studies, sops = {}, set(), set()
    for path in files:
        assert check_dicom(path) == []
        raw = path.read_bytes()
        assert raw[128:132] == b"DICM"
        assert not any(s in raw.lower() for s in REAL_IDENTIFIERS)
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == SC_IMAGE_STORAGE == pydicom.uid.SecondaryCaptureImageStorage
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.ImageComments.startswith(SYNTHETIC_MARKER) and "SYNTHETIC" in ds.SeriesDescription
        assert ds.BurnedInAnnotation == "NO" and ds.ConversionType == "SYN"
        assert str(ds.PatientName) == PATIENT_NAME and ds.PatientID == PATIENT_ID
        assert ds.PatientBirthDate == "" and ds.StudyDate == ""
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation, ds.Rows, ds.Columns) == (16, 16, 0, 128, 128)
        assert [float(v) for v in ds.PixelSpacing] == [SPACING_MM, SPACING_MM]
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0] and list(ds.PatientOrientation) == [
            "L",
            "P",
        ]
        assert [float(v) for v in ds.ImagePositionPatient] == [0, 0, 0] and ds.Laterality == ""
        series.setdefault(path.parent.name, set()).add(ds.SeriesInstanceUID)
        studies.add(ds.StudyInstanceUID)
        sops.add(ds.SOPInstanceUID)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    # One study, one series per class, a unique instance per file.
    assert len(studies) == 1 and all(len(s) == 1 for s in series.values())
    assert len(set().union(*series.values())) == 2 and len(sops) == len(files)
    if shutil.which("dciodvfy"):
        import subprocess

        res = subprocess.run(["dciodvfy", str(files[0])], capture_output=True, text=True)
        assert "Error" not in res.stdout + res.stderr, res.stdout + res.stderr


def test_check_dicom_flags_a_real_looking_file(exports, tmp_path):
    import pydicom

    ds = pydicom.dcmread(next((exports["dicom"] / "images").rglob("*.dcm")))
    ds.PatientName, ds.ImageType = "Doe^Jane", ["ORIGINAL", "PRIMARY"]
    del ds.ConversionType
    ds.save_as(tmp_path / "x.dcm")
    problems = "\n".join(check_dicom(tmp_path / "x.dcm"))
    assert "ConversionType" in problems and "ImageType" in problems and "synthetic placeholder" in problems


def test_same_model_and_seed_give_identical_files(loaded, exports, tmp_path):
    import pydicom

    for variant, fmt, extra in (("png8", "png", {}), ("png16", "png", {"png_bits": 16}), ("npy", "npy", {}),
                                ("nifti", "nifti", {}), ("dicom", "dicom", {})):  # fmt: skip
        again = export_dataset(loaded, make_cfg(fmt, workers=3, **extra), tmp_path / variant, progress=False).out
        first = exports[variant]
        assert (again / "slices.npy").read_bytes() == (first / "slices.npy").read_bytes()
        assert SliceDataset.open(again).content_hash == SliceDataset.open(first).content_hash
        assert (again / "manifest.csv").read_bytes() == (first / "manifest.csv").read_bytes()
        for row in manifest(first):
            a, b = first / row["file"], again / row["file"]
            if fmt == "dicom":
                da, db = pydicom.dcmread(a), pydicom.dcmread(b)
                assert da.PixelData == db.PixelData and da.SOPInstanceUID != db.SOPInstanceUID
            else:
                assert a.read_bytes() == b.read_bytes(), row["file"]
    # A class's images do not depend on which other classes are exported; another seed gives other images.
    only_b = export_dataset(loaded, make_cfg("npy"), tmp_path / "only_b", classes=["b"], progress=False).out
    assert [r["file"] for r in manifest(only_b)] == [f"images/b/{i:05d}.npy" for i in range(N_PER_CLASS)]
    for r in manifest(only_b):
        assert (only_b / r["file"]).read_bytes() == (exports["npy"] / r["file"]).read_bytes()
    other = export_dataset(loaded, make_cfg("npy", seed=7), tmp_path / "seed7", progress=False).out
    assert manifest(other)[0]["seed"] == "7"
    assert not np.array_equal(np.load(other / "slices.npy"), np.load(exports["npy"] / "slices.npy"))


def test_refuses_non_empty_output_without_force(loaded, tmp_path):
    out = tmp_path / "synthetic"
    export_dataset(loaded, make_cfg("npy", n=1), out, progress=False)
    with pytest.raises(FileExistsError, match="--force"):
        export_dataset(loaded, make_cfg("npy", n=2), out, progress=False)
    assert len(manifest(out)) == 2
    res = export_dataset(loaded, make_cfg("npy", n=2), out, force=True, progress=False)  # an earlier export: replaced
    assert res.n_images == 4 and len(manifest(out)) == 4 and SliceDataset.open(out).synthetic
    assert not out.with_name("synthetic.partial").exists()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        export_dataset(loaded, make_cfg("npy", n=1), tmp_path / "a_file", force=True, progress=False)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_force_never_deletes_what_medgan_export_did_not_write(loaded, tmp_path):
    """--force replaces an earlier export only: an unrelated file, a real dataset, or an export someone added a file
    to are refused with the reason, and every byte stays where it was."""
    from medgan.dataset import write_dataset

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    real = tmp_path / "real"
    rows = [{"split": "train", "label": i % 2, "patient": "p-1", "volume": "p-2", "slice_index": i,
             "position_mm": 0.0, "spacing_mm": 1.0, "modality": "CT", "seed": ""} for i in range(4)]  # fmt: skip
    write_dataset(real, np.zeros((4, 1, 128, 128), np.float16), rows, ["a", "b"])
    added = tmp_path / "added"
    export_dataset(loaded, make_cfg("png", n=1), added, progress=False)
    (added / "images" / "a" / "extra.png").write_bytes(b"not from medgan")
    renamed = tmp_path / "renamed"
    export_dataset(loaded, make_cfg("png", n=1), renamed, progress=False)
    (renamed / "labels.csv").write_text("a user's table")
    reasons = {
        mine: "no readable dataset.json",
        real: r"real dataset \(dataset.json says synthetic: false\); medgan never replaces one",
        added: r"files medgan export did not write: \['images/a/extra.png'\]",
        renamed: r"files medgan export did not write: \['labels.csv'\]",
    }
    for out, why in reasons.items():
        before = _tree(out)
        with pytest.raises(FileExistsError, match=f"--force replaces only an earlier medgan export, and .*{why}"):
            export_dataset(loaded, make_cfg("npy", n=1), out, force=True, progress=False)
        assert _tree(out) == before and not out.with_name(out.name + ".partial").exists()
    assert SliceDataset.open(real).synthetic is False and len(SliceDataset.open(real)) == 4
    # A folder left at <out>.partial that holds other files is not removed either.
    odd = tmp_path / "new.partial"
    odd.mkdir()
    (odd / "thesis.tex").write_text("draft")
    with pytest.raises(FileExistsError, match=r"new.partial holds files medgan export did not write"):
        export_dataset(loaded, make_cfg("npy", n=1), tmp_path / "new", progress=False)
    assert (odd / "thesis.tex").read_text() == "draft"


def test_the_cli_refuses_force_over_a_real_dataset(tmp_path):
    from click.testing import CliRunner

    from medgan.cli import main
    from medgan.dataset import write_dataset

    real = tmp_path / "real"
    rows = [{"split": "train", "label": 0, "patient": "p-1", "volume": "p-2", "slice_index": 0, "position_mm": 0.0,
             "spacing_mm": 1.0, "modality": "CT", "seed": ""}]  # fmt: skip
    write_dataset(real, np.zeros((1, 1, 128, 128), np.float16), rows, ["a"])
    before = _tree(real)
    res = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "missing.pt"), "--out", str(real), "--force"])
    assert res.exit_code == 1 and _tree(real) == before
    assert "real dataset (dataset.json says synthetic: false); medgan never replaces one" in res.output


def test_interrupted_export_leaves_the_old_folder_and_no_partial(loaded, tmp_path, monkeypatch):
    import medgan.export as export_mod

    out = tmp_path / "synthetic"
    export_dataset(loaded, make_cfg("npy", n=1), out, progress=False)
    before = (out / "slices.npy").read_bytes()
    calls = []

    def failing(fmt, image, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return b"x"

    monkeypatch.setattr(export_mod, "encode", failing)
    with pytest.raises(OSError, match="disk full"):
        export_dataset(loaded, make_cfg("npy", n=3, seed=5), out, force=True, progress=False)
    assert (out / "slices.npy").read_bytes() == before
    assert not out.with_name("synthetic.partial").exists()


def test_options_and_class_names_are_validated(loaded, tmp_path):
    with pytest.raises(ValueError, match=r"unknown class\(es\) \['c'\].*\['a', 'b'\]"):
        export_dataset(loaded, make_cfg("png"), tmp_path / "x", classes=["a", "c"], progress=False)
    with pytest.raises(ValueError, match="n-per-class"):
        export_dataset(loaded, make_cfg("png", n=0), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="png_bits"):
        export_dataset(loaded, make_cfg("png", png_bits=12), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="format"):
        export_dataset(loaded, make_cfg("jpeg"), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="split"):
        export_dataset(loaded, make_cfg("png", split="holdout"), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_export_is_a_synthetic_slice_dataset(exports):
    ds = SliceDataset.open(exports["png8"])
    assert ds.synthetic is True and ds.classes == ["a", "b"]
    assert ds.images.shape == (2 * N_PER_CLASS, 1, 128, 128) and ds.images.dtype == np.float16
    assert list(ds.labels) == [0] * N_PER_CLASS + [1] * N_PER_CLASS
    assert len(ds.indices("train")) == len(ds) and len(ds.indices("test")) == 0
    assert ds.column("seed").tolist() == [int(r["seed"]) for r in manifest(exports["png8"])]
    assert set(ds.column("patient")) == {""} and set(ds.column("volume")) == {"synthetic"}
    gen, ex = ds.meta["generator"], ds.meta["export"]
    assert (gen["model_uri"], gen["version"], gen["run_id"]) == ("models:/medgan-demo/3", "3", "0123abcd")
    assert ds.meta["source_dataset_hash"] == "f" * 64
    assert ex["spacing_mm"] == SPACING_MM and ex["spacing_source"] == "training dataset"
    assert ds.meta["config"]["model"]["width"] == 8  # the generator's own model config travels with the data
    assert ds.meta["counts"]["train"] == {"a": N_PER_CLASS, "b": N_PER_CLASS}
    readme = (exports["png8"] / "README.md").read_text()
    assert readme.startswith("# SYNTHETIC DATA") and "None is a real patient" in readme


def test_monai_reads_the_datalist_and_a_classifier_trains_on_it(loaded, tmp_path):
    from monai.data import CacheDataset, DataLoader, load_decathlon_datalist
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd

    n = 8
    out = export_dataset(loaded, make_cfg("png", n=n), tmp_path / "syn", progress=False).out
    items = load_decathlon_datalist(out / "datalist.json", data_list_key="training")
    assert len(items) == 2 * n and all(Path(it["image"]).is_file() for it in items)
    assert [it["label"] for it in items] == [0] * n + [1] * n
    assert json.loads((out / "datalist.json").read_text())["labels"] == {"0": "a", "1": "b"}

    torch.manual_seed(0)
    tf = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), ScaleIntensityd("image")])
    data = CacheDataset(items, transform=tf, cache_rate=1.0, num_workers=0, progress=False)  # decode the files once
    loader = DataLoader(data, batch_size=2 * n, shuffle=False, num_workers=0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 5, stride=4, padding=2), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2),
    )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        for batch in loader:
            x, y = batch["image"].float(), torch.as_tensor(batch["label"])
            assert x.shape == (2 * n, 1, 128, 128) and float(x.min()) >= 0 and float(x.max()) <= 1
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        assert bool((net(x).argmax(1) == y).all())


def test_monai_loads_every_format_as_the_same_array(exports, reference):
    """LoadImaged + EnsureChannelFirstd give one [1, 128, 128] array for PNG, NPY, NIfTI and DICOM (MONAI's x-first
    order: [column, row]), and the NIfTI and DICOM affines agree in-plane."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    load = Compose([LoadImaged("image"), EnsureChannelFirstd("image")])
    row = manifest(exports["png16"])[5]
    label, index = int(row["label"]), int(row["seed"]) - int(row["label"]) * SEED_STRIDE
    ref = reference[(label, index)][0].T  # [column, row]
    ext = {"png16": ".png", "npy": ".npy", "nifti": ".nii.gz", "dicom": ".dcm"}
    loaded, affines = {}, {}
    for variant, suffix in ext.items():
        image = load({"image": str(exports[variant] / row["file"].replace(".png", suffix))})["image"]
        x = np.asarray(image, dtype=np.float64)
        loaded[variant] = x / 32767.5 - 1 if variant == "png16" else x
        affines[variant] = np.asarray(image.affine)
    for variant, x in loaded.items():
        assert x.shape == (1, 128, 128), variant
        assert np.abs(x[0] - ref).max() <= QUANTIZATION[variant] + 1e-6, variant
    nifti, dicom = affines["nifti"], affines["dicom"]
    assert np.allclose(nifti[:2, :2], np.diag([-SPACING_MM, -SPACING_MM])) and np.allclose(dicom[:2], nifti[:2])


def test_cli_export_runs_and_refuses(loaded, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from medgan.cli import main

    seen = {}

    def load_generator(ref: str, tracking_uri: str = ""):
        seen["ref"], seen["uri"] = ref, tracking_uri
        return tiny_loaded()

    from medgan.tracking import registry

    monkeypatch.setattr(registry, "load_generator", load_generator)
    out = tmp_path / "syn"
    args = ["export", "--model", "models:/medgan-demo@champion", "--out", str(out), "--n-per-class", "2",
            "--format", "npy", "--seed", "3", "--classes", "b", "--tracking-uri", "sqlite:///x.db"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "SYNTHETIC" in res.output and seen == {"ref": "models:/medgan-demo@champion", "uri": "sqlite:///x.db"}
    assert [r["seed"] for r in manifest(out)] == [str(3 + SEED_STRIDE), str(4 + SEED_STRIDE)]
    assert SliceDataset.open(out).meta["generator"]["model_uri"] == "models:/medgan-demo/3"
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "--force" in res.output


def test_evaluate_sees_the_export_as_synthetic(exports):
    features = pytest.importorskip("medgan.evaluate.features")
    with pytest.raises(ValueError, match="synthetic"):
        features.real_classifier(SliceDataset.open(exports["npy"]), features.Recipe())


def test_run_export_from_a_checkpoint_file(tmp_path):
    """`run_export` resolves a checkpoint path through `medgan.tracking.registry.load_generator` (no store needed)."""
    from medgan.checkpoint import save
    from medgan.config import to_dict
    from medgan.export import run_export

    src = tiny_loaded()
    cfg = make_cfg("png", n=2)
    cfg.model = src.model_cfg
    ckpt = save(tmp_path / "ckpt-000001.pt", {
        "G_ema": src.G.state_dict(), "config": to_dict(cfg), "classes": src.classes, "dataset_hash": "d" * 64,
    })  # fmt: skip
    res = run_export(cfg, str(ckpt), tmp_path / "syn", classes=["a"], force=False)
    assert res.n_images == 2 and res.counts == {"a": 2}
    ds = SliceDataset.open(res.out)
    assert ds.synthetic and ds.meta["generator"]["checkpoint"] == str(ckpt)
    assert ds.meta["source_dataset_hash"] == "d" * 64
    assert ds.meta["export"]["spacing_source"].startswith("default")  # checkpoints carry no spacing (yet)
    ref = generate(src.G, [0, 0], [image_seed(0, 0, 0), image_seed(0, 0, 1)], batch_size=3)
    assert np.abs(read_image(res.out / "images/a/00001.png")[0] - ref[1, 0]).max() <= QUANTIZATION["png8"] + 1e-6
