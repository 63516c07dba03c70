"""The GenEval-style scorer on its own: ground-truth renders pass, noise and blank images fail,
and a render with one attribute changed (colour, shape, count, side) fails its prompt; the
evaluation prompt set; ecdit-evaluate's output and its one-line errors."""

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest

from megatron_ecdit.data.synthetic import (COLORS, HELD_OUT_TASKS, TASKS, draw_scene,
                                           held_out, render_scene)
from megatron_ecdit.evaluation.geneval import (
    all_scenes,
    detect_objects,
    evaluation_prompts,
    geneval_metadata,
    score,
    summarize,
)
from megatron_ecdit.tools import evaluate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=[32, 16])  # the demo's resolution and the tests' one
def scenes(request):
    rng = random.Random("test_evaluate")
    return [render_scene(rng, request.param) for _ in range(240)]


def verdicts(scenes, image_of=lambda image, meta: image, meta_of=lambda meta: meta):
    return [(meta["task"], score(detect_objects(image_of(image, meta)),
                                 geneval_metadata(meta_of(meta)))[0])
            for image, _, meta in scenes]


def test_ground_truth_renders_pass_every_task(scenes):
    result = summarize(verdicts(scenes))
    assert set(result["tasks"]) == set(TASKS) and min(result["counts"].values()) >= 25
    assert min(result["tasks"].values()) >= 0.95, result


def test_detector_finds_each_object_with_its_shape_colour_and_box(scenes):
    for image, _, meta in scenes:
        found = detect_objects(image)
        want = sorted((o["shape"], o["color"]) for o in meta["objects"])
        assert sorted((o.shape, o.color) for o in found) == want, meta
        for obj in meta["objects"]:  # each box within a pixel of the drawn one
            assert any(np.abs(np.subtract(o.bbox, obj["bbox"])).max() <= 1 for o in found)


def test_noise_and_blank_images_score_zero(scenes):
    rng = np.random.default_rng(0)
    shape = (scenes[0][0].height, scenes[0][0].width, 3)
    noise = summarize(verdicts(scenes, lambda image, meta: rng.integers(0, 256, shape,
                                                                         dtype=np.uint8)))
    blank = summarize(verdicts(scenes, lambda image, meta: np.full(shape, 255, np.uint8)))
    assert noise["overall"] <= 0.01 and max(noise["tasks"].values()) <= 0.05, noise
    assert blank["overall"] == 0.0, blank


def redrawn(change):
    """An image_of that draws the scene again with `change` applied to a copy of its objects."""
    def image_of(image, meta):
        objects = copy.deepcopy(meta["objects"])
        change(objects)
        return draw_scene(objects, image.width)
    return image_of


def other_color(objects):
    used = {o["color"] for o in objects}
    objects[0]["color"] = next(c for c in COLORS if c not in used)


def other_shape(objects):
    shapes = ("circle", "square", "triangle")
    objects[0]["shape"] = shapes[(shapes.index(objects[0]["shape"]) + 1) % 3]


def swapped_places(objects):
    objects[0]["bbox"], objects[1]["bbox"] = objects[1]["bbox"], objects[0]["bbox"]


@pytest.mark.parametrize("tasks,change", [
    (("colors", "color_attr", "position", "counting"), other_color),
    (("single_object", "colors", "two_objects", "color_attr", "position"), other_shape),
    (("position",), swapped_places),
    (("single_object", "colors", "two_objects", "color_attr", "position", "counting"),
     lambda objects: objects.pop()),  # one object fewer
], ids=["colour", "shape", "side", "count"])
def test_a_changed_attribute_fails_its_task(scenes, tasks, change):
    affected = [s for s in scenes if s[2]["task"] in tasks]
    result = summarize(verdicts(affected, redrawn(change)))
    assert set(result["tasks"]) == set(tasks)
    assert max(result["tasks"].values()) == 0.0, result


def test_one_object_too_many_fails_counting(scenes):
    counting = [s for s in scenes if s[2]["task"] == "counting" and len(s[2]["objects"]) > 2]
    fewer = lambda meta: dict(meta, objects=meta["objects"][:-1])  # noqa: E731
    assert summarize(verdicts(counting, meta_of=fewer))["tasks"] == {"counting": 0.0}


def test_evaluation_prompts_file_is_the_generated_set(tmp_path):
    text = (ROOT / "examples/prompts/geneval_synthetic.jsonl").read_text()
    assert evaluate.main(["prompts", str(tmp_path / "p.jsonl")]) == 0
    assert (tmp_path / "p.jsonl").read_text() == text
    assert evaluate.main(["prompts", str(tmp_path / "h.jsonl"), "--held-out"]) == 0
    assert (tmp_path / "h.jsonl").read_text() == \
        (ROOT / "examples/prompts/geneval_synthetic_held_out.jsonl").read_text()
    lines = text.splitlines()
    records = [json.loads(line) for line in lines]
    assert records == evaluation_prompts()
    assert [r["tag"] for r in records] == [t for t in TASKS for _ in range(16)]
    for task in TASKS:  # distinct prompts where the task has 16 (all but single_object,
        prompts = [r["prompt"] for r in records if r["tag"] == task]  # two_objects, colors)
        assert len(set(prompts)) == min(16, len(all_scenes(task)))


def test_the_prompt_vocabulary_is_every_caption_training_can_draw(scenes):
    vocabulary = {geneval_metadata(s)["prompt"] for t in TASKS for s in all_scenes(t)}
    assert len(vocabulary) == 3 + 6 + 36 + 12 + 288 + 72
    assert {caption for _, caption, _ in scenes} <= vocabulary


def test_held_out_captions_are_never_drawn_and_their_words_are():
    """A fixed part of the position and color_attr captions (42 of 288, 16 of 72) never
    appears in the data, while every shape, colour and relation of theirs does, in other
    compositions; the held-out prompt set holds only them, the standard set none."""
    unseen = {t: {geneval_metadata(s)["prompt"] for s in all_scenes(t) if held_out(s)}
              for t in TASKS}
    assert {t: len(v) for t, v in unseen.items() if v} == {"position": 42, "color_attr": 16}
    held = set().union(*unseen.values())
    rng = random.Random("held out")
    drawn = [render_scene(rng, 16) for _ in range(4000)]
    captions = {caption for _, caption, _ in drawn}
    assert not captions & held
    for task in HELD_OUT_TASKS:  # the data still draws the task's other captions
        seen = {c for (_, c, m) in drawn if m["task"] == task}
        assert len(seen) >= 0.8 * (len(all_scenes(task)) - len(unseen[task])), task
    words = {w for c in captions for w in c.split()}
    assert {w for c in held for w in c.split()} <= words
    held_out_set = evaluation_prompts(unseen=True)
    assert {r["prompt"] for r in held_out_set} <= held
    assert [r["tag"] for r in held_out_set] == [t for t in HELD_OUT_TASKS for _ in range(16)]
    assert not {r["prompt"] for r in evaluation_prompts()} & held


def write_folder(folder, scenes):
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for i, (image, _, meta) in enumerate(scenes):
            image.save(folder / f"{i:05d}.png")
            f.write(json.dumps({"image": f"{i:05d}.png", **geneval_metadata(meta)}) + "\n")


def test_score_a_folder(scenes, tmp_path, capsys):
    write_folder(tmp_path / "gen", scenes[:60])
    assert evaluate.main(["score", str(tmp_path / "gen")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-1].split() == ["overall", "1.000", "60"]
    assert evaluate.main(["score", str(tmp_path / "gen"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["overall"] == 1.0 and len(result["images"]) == 60
    assert all(v["correct"] for v in result["images"])


def one_line_error(code, err, text):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and text in lines[0], err
    assert "Traceback" not in err


def test_bad_input_is_one_line_and_exit_2(scenes, tmp_path, capsys):
    code = evaluate.main(["score", str(tmp_path / "missing")])
    one_line_error(code, capsys.readouterr().err, "is not a folder")
    write_folder(tmp_path / "gen", scenes[:3])
    with open(tmp_path / "gen/metadata.jsonl", "a") as f:
        f.write("{not json\n")
    code = evaluate.main(["score", str(tmp_path / "gen")])
    one_line_error(code, capsys.readouterr().err, "metadata.jsonl:4 is not JSON")
    write_folder(tmp_path / "gen2", scenes[:3])
    (tmp_path / "gen2/00001.png").unlink()
    code = evaluate.main(["score", str(tmp_path / "gen2")])
    one_line_error(code, capsys.readouterr().err, "metadata.jsonl:2: cannot read image")
    code = evaluate.main(["score", str(tmp_path / "gen"), "--metadata", str(tmp_path / "no")])
    one_line_error(code, capsys.readouterr().err, "cannot read")
