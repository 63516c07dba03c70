"""ecdit-sample: a checkpoint's sample prompts at seed 0 give exactly the images the run drew at
the end of training, from the sharded checkpoint and from its exported folder; its metadata is
what ecdit-evaluate scores; bad input ends in one line and exit code 2."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))

import check_checkpoints as cc  # noqa: E402
from megatron_ecdit.evaluation.geneval import read_jsonl  # noqa: E402
from megatron_ecdit.tools import convert_checkpoint, evaluate, sample_ecdit  # noqa: E402
from megatron_ecdit.training.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["train.sample_prompts=['a red circle','a blue square and a green triangle',"
           "'three yellow circles']"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, ctx):
    out = tmp_path_factory.mktemp("sample") / "out"
    train(cc.config(out, ["train.steps=2", "train.compute_map_prompts=1", *PROMPTS]))
    return out


def test_samples_equal_the_end_of_training_images(run, tmp_path, capsys):
    assert sample_ecdit.main([str(run / "checkpoints"), str(tmp_path / "a")]) == 0
    assert (tmp_path / "a/grid.png").read_bytes() == (run / "samples.png").read_bytes()
    assert (tmp_path / "a/compute_map.png").read_bytes() == (run / "compute_map.png").read_bytes()
    records = read_jsonl(tmp_path / "a/metadata.jsonl")
    assert [r["prompt"] for r in records] == ["a red circle", "a blue square and a green triangle",
                                              "three yellow circles"]
    assert all((tmp_path / "a" / r["image"]).is_file() for r in records)
    assert [r["seed"] for r in records] == [0, 1, 2]
    assert convert_checkpoint.main(["export", str(run / "checkpoints"), str(tmp_path / "x")]) == 0
    assert sample_ecdit.main([str(tmp_path / "x"), str(tmp_path / "b")]) == 0
    assert (tmp_path / "b/grid.png").read_bytes() == (run / "samples.png").read_bytes()
    assert sample_ecdit.main([str(run / "checkpoints"), str(tmp_path / "c"), "--seed", "1"]) == 0
    assert (tmp_path / "c/grid.png").read_bytes() != (run / "samples.png").read_bytes()
    # The other precision than the run's: recorded, and nearly the same images (this barely
    # trained model's output is small, so they may even be equal).
    trained = json.loads((run / "config.json").read_text())["train"]["precision"]
    other = "fp32" if trained == "bf16" else "bf16"
    assert sample_ecdit.main([str(run / "checkpoints"), str(tmp_path / "d"),
                              "--precision", other]) == 0
    assert {r["precision"] for r in read_jsonl(tmp_path / "d/metadata.jsonl")} == {other}
    for name in ("00000.png", "00002.png"):
        mine, ref = (np.asarray(Image.open(tmp_path / f / name)).astype(int) for f in "da")
        assert np.abs(mine - ref).max() <= 8 and ref.std() > 0


def test_geneval_prompts_are_sampled_with_their_metadata_and_scored(run, tmp_path, capsys):
    prompts = ROOT / "examples/prompts/geneval_synthetic.jsonl"
    first = read_jsonl(prompts)[::16]  # one prompt of each task
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first))
    assert sample_ecdit.main([str(run / "checkpoints"), str(tmp_path / "s"), "--prompts",
                              str(tmp_path / "p.jsonl"), "--images-per-prompt", "2",
                              "--batch-size", "4", "--capacity-factor", "1", "3",
                              "--steps", "1", "--compute-maps", "0"]) == 0
    assert not (tmp_path / "s/compute_map.png").exists()
    records = read_jsonl(tmp_path / "s/metadata.jsonl")
    assert len(records) == 12 and [r["seed"] for r in records] == list(range(12))
    assert all(r["capacity_factors"] == [1.0, 3.0] and r["steps"] == 1 for r in records)
    assert [{k: r[k] for k in f} for r, f in zip(records, first * 2)] == first * 2
    capsys.readouterr()
    assert evaluate.main(["score", str(tmp_path / "s"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["images"]) == 12


def test_prompts_from_the_command_line_or_a_text_file(run, tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\ntwo blue squares\n")
    for name, args in (("cli", ["--prompt", "a red circle", "--prompt", "two blue squares"]),
                       ("txt", ["--prompts", str(tmp_path / "p.txt")])):
        assert sample_ecdit.main([str(run / "checkpoints"), str(tmp_path / name), *args,
                                  "--steps", "1", "--compute-maps", "0"]) == 0
        records = read_jsonl(tmp_path / name / "metadata.jsonl")
        assert [r["prompt"] for r in records] == ["a red circle", "two blue squares"]
    assert (tmp_path / "cli/00001.png").read_bytes() == (tmp_path / "txt/00001.png").read_bytes()


@pytest.mark.parametrize("args,text", [
    (["--capacity-factor", "0"], "capacity_factor must be > 0"),
    (["--capacity-factor", "1", "-1"], "layer_capacity_factors must all be > 0"),
    (["--prompts", "{bad}.jsonl"], "is not JSON"),
    (["--prompts", "missing.txt"], "cannot read"),
])
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys, monkeypatch, args, text):
    monkeypatch.chdir(tmp_path)
    Path("{bad}.jsonl").write_text('{"prompt": "a circle"}\n{oops\n')
    code = sample_ecdit.main([str(run / "checkpoints"), "out", *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and text in err, err


def test_a_missing_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    assert sample_ecdit.main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


SIX = ["a red circle", "a blue square", "a green triangle", "two yellow squares",
       "a red circle left of a blue square", "three green circles"]


def pixels(folder: Path, names: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / n)).astype(int) for n in names])


def test_an_image_depends_on_its_prompt_and_seed_not_on_its_batch(run, tmp_path):
    """Six prompts in one batch, three of them alone with their recorded seeds, and the six in
    batches of 2: the same images within 2 levels of 255 (batched GEMMs may round
    differently)."""
    (tmp_path / "six.txt").write_text("\n".join(SIX) + "\n")
    common = ["--prompts", str(tmp_path / "six.txt"), "--seed", "5", "--compute-maps", "0"]
    assert sample_ecdit.main([str(run / "checkpoints"), str(tmp_path / "all"), *common]) == 0
    assert sample_ecdit.main([str(run / "checkpoints"), str(tmp_path / "pairs"), *common,
                              "--batch-size", "2"]) == 0
    records = read_jsonl(tmp_path / "all/metadata.jsonl")
    assert [r["seed"] for r in records] == [5, 6, 7, 8, 9, 10]
    assert read_jsonl(tmp_path / "pairs/metadata.jsonl") == records
    names = [r["image"] for r in records]
    together = pixels(tmp_path / "all", names)
    assert together.std() > 0 and np.abs(together[0] - together[1]).max() > 100
    assert np.abs(pixels(tmp_path / "pairs", names) - together).max() <= 2
    for i in (1, 3, 4):
        alone = tmp_path / f"alone{i}"
        assert sample_ecdit.main([str(run / "checkpoints"), str(alone), "--prompt",
                                  records[i]["prompt"], "--seed", str(records[i]["seed"]),
                                  "--compute-maps", "0"]) == 0
        assert read_jsonl(alone / "metadata.jsonl")[0]["seed"] == records[i]["seed"]
        assert np.abs(pixels(alone, ["00000.png"])[0] - together[i]).max() <= 2, i
