"""The toy world: generator, tokenizer, the whole VISOR path at CI size, and the demo on the kept checkpoint."""

import contextlib
import io
import json
import os
import re
import shutil

import pytest
import torch

from visor_hf import VisorForConditionalGeneration
from visor_hf.demo import DEFAULT_MODEL
from visor_hf.demo import main as demo_main
from visor_hf.processing_visor import ROUTING_TOKEN, VisorProcessor
from visor_hf.toyworld import world
from visor_hf.toyworld.model import build_tokenizer, dense_config, dense_processor, image_processor, save_tokenizer
from visor_hf.toyworld.pipeline import logged_losses, run_pipeline
from visor_hf.training.data import VisorDataCollator, to_messages


def test_world_is_seeded_balanced_and_answers_are_single_words():
    first = [r for r, _ in world.split_records("test", 20, seed=3)]
    again = [r for r, _ in world.split_records("test", 20, seed=3)]
    other = [r for r, _ in world.split_records("test", 20, seed=4)]
    assert first == again and first != other
    assert [r["family"] for r in first[:5]] == list(world.FAMILIES)
    assert {r["kind"] for r in first} == {"coarse", "fine"}
    train = [r for r, _ in world.split_records("train", 10, seed=3, questions_per_image=3)]
    assert all(len(r["conversations"]) == 6 and len(set(r["question_families"])) == 3 for r in train)
    answers = {f: {r["conversations"][1]["value"] for r, _ in world.split_records("val", 200, seed=0) if r["family"] == f}
               for f in world.FAMILIES}
    assert answers["side_large"] == {"left", "right"}
    assert answers["count_left"] == answers["count_above"] == set(world.COUNTS)
    assert all(r["kind"] == "mixed" for r in train)
    vocabulary = set(world.vocabulary())
    for record in first + train:
        for turn in record["conversations"]:
            words = re.findall(r"[A-Za-z]+|\d|[^\sA-Za-z\d]", turn["value"].replace("<image>", ""))
            assert set(words) <= vocabulary, turn["value"]
        assert all(len(t["value"].split()) == 1 for t in record["conversations"][1::2])


def test_scenes_are_well_formed():
    import numpy
    import random

    for i in range(100):
        scene = world.sample_scene(random.Random(i))
        assert 2 <= len(scene.small) <= 4 and all(s.size < scene.large.size for s in scene.small)
        assert abs(scene.large.centre_x - world.CANVAS / 2) >= 4  # left/right is unambiguous
        for s in scene.small:  # left of / above the large shape or not: never a tie
            assert abs(s.centre_x - scene.large.centre_x) >= world.SEPARATION
            assert abs(s.centre_y - scene.large.centre_y) >= world.SEPARATION
        boxes = [s.box() for s in [scene.large, *scene.small]]
        assert all(0 <= b[0] and 0 <= b[1] and b[2] <= world.CANVAS and b[3] <= world.CANVAS for b in boxes)
        assert not any(world._overlaps(a, b, 0) for j, a in enumerate(boxes) for b in boxes[j + 1:])
        image = numpy.asarray(world.render(scene))
        assert image.shape == (world.CANVAS, world.CANVAS, 3)
        for k, shape in enumerate([scene.large, *scene.small]):  # each shape's centre pixel has its (tinted) colour
            colour = world._fill(shape.colour, scene.tints[k])
            assert tuple(image[int(shape.centre_y), int(shape.centre_x)]) == colour


def test_fine_answers_count_the_small_shapes_left_of_and_above_the_large_one():
    large = world.Shape("red", "square", 20, 20, 20)  # centre (30, 30)
    small = [world.Shape("blue", "circle", 2, 2, 8), world.Shape("green", "circle", 50, 4, 8),
             world.Shape("yellow", "triangle", 4, 50, 8)]  # top left, top right, bottom left
    scene = world.Scene(large, small)
    rng = __import__("random").Random(0)
    assert world.ask(scene, "count_left", rng) == ("how many small shapes are left of the large shape?", "2")
    assert world.ask(scene, "count_above", rng) == ("how many small shapes are above the large shape?", "2")
    assert world.ask(world.Scene(large, small[1:2]), "count_left", rng)[1] == "0"
    assert world.ask(world.Scene(large, small[2:]), "count_above", rng)[1] == "0"
    with pytest.raises(ValueError, match="allowed"):
        world.ask(scene, "number_large", rng)


def test_in_memory_dataset_holds_images():
    dataset = world.in_memory_dataset("val", 4, seed=0)
    assert len(dataset) == 4 and dataset[0]["image"].size == (64, 64)
    assert dataset[0]["conversations"][0]["value"].startswith("<image>\n")


def test_word_level_tokenizer_labels_exactly_the_answers(tmp_path):
    tokenizer = build_tokenizer()
    assert tokenizer("assistant\n", add_special_tokens=False)["input_ids"] == tokenizer.convert_tokens_to_ids(["assistant", "\n"])
    processor = dense_processor(tokenizer, image_processor(dense_config()))
    record, image = next(world.split_records("train", 1, seed=0, questions_per_image=3))
    image.save(tmp_path / "0.png")
    record["image"] = "0.png"
    text = processor.apply_chat_template(to_messages(record), add_generation_prompt=False)
    assert ROUTING_TOKEN not in text  # the dense prompt is LLaVA-OneVision's
    batch = VisorDataCollator(processor, str(tmp_path))([record])
    assert int((batch["input_ids"] == tokenizer.unk_token_id).sum()) == 0
    assert int((batch["input_ids"] == dense_config().image_token_index).sum()) == 88
    answers = [t["value"] for t in record["conversations"][1::2]]
    for q, answer in enumerate(answers):
        assert tokenizer.decode(batch["labels"][0][batch["question_index"][0] == q]) == f"{answer} <|im_end|>"
    save_tokenizer(tmp_path / "tok")  # hand-written files: what both transformers lines load
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("toyworld")
    run = run_pipeline(str(root / "run"), preset="ci", save_checkpoint_to=str(root / "checkpoint"), last="checkpoint")
    return run, root


@pytest.mark.slow
def test_pipeline_trains_and_every_artefact_loads(pipeline):
    run, root = pipeline
    dense_log = json.loads(open(run.path("dense", "training_log.json")).read())
    losses = [h["loss"] for h in dense_log["log_history"] if "loss" in h]
    assert losses[-1] < losses[0] - 0.2, losses  # training the dense baseline lowers the loss
    universal = logged_losses(open(run.path("logs", "universal.log")).read())
    assert len(universal) == 6 and min(universal[-2:]) < universal[0], universal
    for folder in ("visor", "stage1", "universal", "searched", "final"):
        model = VisorForConditionalGeneration.from_pretrained(run.path(folder))
        assert model.config.routing_token_id is not None
    final = VisorForConditionalGeneration.from_pretrained(run.path("final"))
    assert [tuple(c) for c in final.config.configurations][-1] == (1, 2)
    labels = [json.loads(line) for line in open(run.path("labels.jsonl"))]
    assert len(labels) == 20 and all(tuple(line["self_attn_layers"]) in map(tuple, final.config.configurations) for line in labels)
    results = json.load(open(run.path("results.json")))
    assert set(results["budgets"]) == {str(tuple(c)) for c in final.config.configurations} | {"auto"}
    assert results["dense"]["all"]["relative_flops"] == 1.0
    assert results["budgets"]["()"]["all"]["relative_flops"] < results["budgets"]["(1, 2)"]["all"]["relative_flops"] < 1.0
    reduction = {e["name"]: e["summary"] for e in results["reduction"]}  # pruning rows (issue 8)
    assert reduction["VISOR full + visionzip @ 0.25"]["all"]["relative_flops"] < results["budgets"]["(1, 2)"]["all"]["relative_flops"]
    assert reduction["VISOR auto + vispruner @ 0.25"]["all"]["questions"] == results["dense"]["all"]["questions"]
    assert all(reduction[f"dense + {m} @ 0.25"]["all"]["relative_flops"] < 1.0 for m in ("visionzip", "vispruner"))
    assert all(0.25 <= s["all"]["visual_tokens_kept"] < 0.5 for name, s in reduction.items() if "@ 0.25" in name)
    assert sum(e["matched"] is not None for e in results["reduction"]) == 1
    report = open(run.path("report", "results.md")).read()
    assert "Token reduction" in report and "dense + visionzip" in report
    assert "budget=\"auto\"" in report and "(a)" in report and os.path.getsize(run.path("report", "results.png")) > 1000
    assert "python -m visor_hf.train universal" in open(run.path("commands.sh")).read()
    processor = VisorProcessor.from_pretrained(root / "checkpoint")  # processor files from the converter: both lines
    assert processor.routing_token_id == final.config.routing_token_id


def run_demo(*argv) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        demo_main(list(argv))
    return printed.getvalue()


@pytest.mark.slow
def test_demo_runs_on_a_pipeline_checkpoint(pipeline):
    _, root = pipeline
    out = run_demo("--model", str(root / "checkpoint"), "--budget", "0")
    assert out.count("configuration: self-attention layers [] (0 of 2), fixed by --budget 0") == 2
    assert "Q: how many small shapes are left of the large shape?" in out


@pytest.mark.skipif(not os.path.exists(os.path.join(DEFAULT_MODEL, "config.json")), reason="no kept checkpoint yet")
def test_demo_answers_with_the_kept_checkpoint(tmp_path):
    out = run_demo("--save-image", str(tmp_path / "scene.png"))
    answers = re.findall(r"^A: (\S+)\s+\(reference: (\S+)\)$", out, re.M)
    assert len(answers) == 2, out
    assert all(answer == reference for answer, reference in answers), out
    assert len(re.findall(r"configuration: self-attention layers \[[\d, ]*\] \(\d of \d\), chosen by the router", out)) == 2
    ratios = [float(x) for x in re.findall(r"dense \((\d+\.\d\d)x fewer than dense\)", out)]
    assert len(ratios) == 2 and all(r > 1 for r in ratios)
    assert (tmp_path / "scene.png").exists()
    out = run_demo("--budget", "full", "--question", "what shape is the large shape?", "--image", str(tmp_path / "scene.png"))
    assert re.search(r"^A: (circle|square|triangle)$", out, re.M), out


def test_kept_checkpoint_is_small():
    if not os.path.exists(os.path.join(DEFAULT_MODEL, "config.json")):
        pytest.skip("no kept checkpoint yet")
    total = sum(os.path.getsize(os.path.join(DEFAULT_MODEL, f)) for f in os.listdir(DEFAULT_MODEL))
    assert total < 10 * 2**20
    with torch.no_grad():
        model = VisorForConditionalGeneration.from_pretrained(DEFAULT_MODEL)
    assert model.config.routing_token_id is not None and len(model.config.configurations) >= 2


def test_kept_checkpoint_carries_the_package_code():
    """The demo loads the kept checkpoint with trust_remote_code: its code files must be the package's own (copy
    visor_hf/{configuration,modeling,processing}_visor.py into visor_hf/toyworld/checkpoint/ after changing them)."""
    if not os.path.exists(os.path.join(DEFAULT_MODEL, "config.json")):
        pytest.skip("no kept checkpoint yet")
    package = os.path.dirname(os.path.dirname(DEFAULT_MODEL))
    for name in ("configuration_visor.py", "modeling_visor.py", "processing_visor.py"):
        with open(os.path.join(package, name), "rb") as ours, open(os.path.join(DEFAULT_MODEL, name), "rb") as kept:
            assert ours.read() == kept.read(), f"{name} of the kept checkpoint differs from visor_hf/{name}"


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    from visor_hf.toyworld.pipeline import run_seeds

    root = tmp_path_factory.mktemp("toyworld_seeds")
    run_seeds(str(root / "runs"), preset="ci", seeds=(3, 4), jobs=2, fresh_world_seed=7)
    return root / "runs"


@pytest.mark.slow
def test_seeds_report_means_and_spreads_of_the_seeds_own_results(seeds_run):
    import statistics

    report = json.loads((seeds_run / "report" / "results.json").read_text())
    per_seed = [json.loads((seeds_run / f"seed{s}" / "results.json").read_text()) for s in (3, 4)]
    assert [r["seed"] for r in per_seed] == [3, 4]
    # each seed drew its own world: the test images differ
    assert (seeds_run / "seed3" / "data" / "test" / "000000.png").read_bytes() != (seeds_run / "seed4" / "data" / "test" / "000000.png").read_bytes()
    merged = report["merged"]
    for group in ("all", "coarse", "fine", "count_left"):
        values = [r["dense"][group]["accuracy"] for r in per_seed]
        entry = merged["dense"][group]["accuracy"]
        assert entry["values"] == values and entry["mean"] == pytest.approx(sum(values) / 2)
        assert entry["sd"] == pytest.approx(statistics.stdev(values))
    auto = [r["budgets"]["auto"]["all"]["relative_flops"] for r in per_seed]
    assert merged["budgets"]["auto"]["all"]["relative_flops"]["mean"] == pytest.approx(sum(auto) / 2)
    assert len(report["claims"]["per_seed"]) == 2 and len(report["claims"]["mean"]) == 3
    assert {row["family"] for row in report["families"]} == set(world.FAMILIES)
    text = (seeds_run / "report" / "results.md").read_text()
    assert "**3 (kept checkpoint)**" in text and "| 4 |" in text and " ± " in text
    assert "seeds [3, 4]" in text and "fresh test split" in text
    assert os.path.getsize(seeds_run / "report" / "results.png") > 1000


@pytest.mark.slow
def test_fresh_split_check_compares_the_kept_model_on_another_world(seeds_run, tmp_path):
    from visor_hf.toyworld.pipeline import fresh_split_check

    check = json.loads((seeds_run / "fresh_split.json").read_text())
    reported = json.loads((seeds_run / "seed3" / "results.json").read_text())
    assert check["world_seed"] == 7 and check["questions"] == 10
    assert set(check["budgets"]) == set(reported["budgets"])
    for name, kinds in check["budgets"].items():
        for kind, entry in kinds.items():
            assert entry["reported"] == reported["budgets"][name][kind]["accuracy"]
            assert entry["difference"] == pytest.approx(entry["fresh"] - entry["reported"])
    assert check["within"] == all(abs(e["difference"]) <= 0.05 for k in check["budgets"].values() for e in k.values())
    # a fresh world's images are not the run's own test images
    assert (seeds_run / "fresh_data" / "test" / "000000.png").read_bytes() != (seeds_run / "seed3" / "data" / "test" / "000000.png").read_bytes()
    # a reported accuracy 50 points off is caught
    shifted = json.loads(json.dumps(reported))
    for summary in shifted["budgets"].values():
        summary["coarse"]["accuracy"] = (summary["coarse"]["accuracy"] + 0.5) % 1.0
    again = fresh_split_check(str(seeds_run / "seed3" / "final"), shifted, str(tmp_path / "fresh"), 7, 10)
    assert again["within"] is False
    assert all(abs(kinds["coarse"]["difference"]) >= 0.45 for kinds in again["budgets"].values())


@pytest.mark.slow
def test_seeds_reuses_finished_seeds(seeds_run):
    from visor_hf.toyworld.pipeline import run_seeds

    before = (seeds_run / "seed3" / "results.json").read_text(), (seeds_run / "seed4" / "results.json").read_text()
    run_seeds(str(seeds_run), preset="ci", seeds=(3, 4), jobs=2, fresh_world_seed=7)  # nothing to train again
    info = json.loads((seeds_run / "seeds.json").read_text())
    assert info["reused"] == [3, 4] and info["seconds"] < 120
    assert ((seeds_run / "seed3" / "results.json").read_text(), (seeds_run / "seed4" / "results.json").read_text()) == before
    text = (seeds_run / "report" / "results.md").read_text()
    assert "no seed trained by this command (seeds [3, 4] ran in an earlier sitting)" in text
    assert "min in all" not in text  # this sitting trained nothing: no total run time is claimed for it
    for seed in (3, 4):  # each seed's own threads and total time, from its run
        run = json.loads((seeds_run / f"seed{seed}" / "results.json").read_text())
        timings = json.loads((seeds_run / f"seed{seed}" / "timings.json").read_text())
        assert f"seed {seed} ({run['machine']['torch_threads']} torch thread(s), {sum(timings.values()) / 60:.0f} min)" in text


@pytest.mark.slow
def test_seeds_refuses_a_finished_run_made_with_other_settings(seeds_run, tmp_path):
    from visor_hf.toyworld.pipeline import finished_run

    copy = tmp_path / "seed3"
    shutil.copytree(seeds_run / "seed3", copy)
    assert finished_run(str(copy), "ci", 3)
    assert not finished_run(str(copy), "ci", 4)  # another seed's folder
    settings = json.loads((copy / "preset.json").read_text())
    today = settings["dense_steps"]
    settings["dense_steps"] = today + 1
    (copy / "preset.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=rf"dense_steps {today + 1} \(today {today}\)"):
        finished_run(str(copy), "ci", 3)


def test_seeds_provenance_gives_each_seed_its_own_timings_whatever_the_order():
    from visor_hf.toyworld.report import seeds_provenance

    merged = {"machine": {"cpu_count": 2, "processor": "x86_64", "torch": "2", "transformers": "5"}, "preset": "ci",
              "seeds": [4, 3], "dense": {"all": {"questions": 10}},
              "model": {"dense_num_parameters": 1e6, "num_parameters": 1e6, "num_layers": 3, "cross_attn_layers": [0],
                        "self_attn_layers": [1], "configurations": [[]]}}
    runs = [{"seed": 4, "machine": {"torch_threads": 2}}, {"seed": 3, "machine": {"torch_threads": 1}}]  # kept seed first
    info = {"command": "c", "jobs": 2, "threads": 1, "seconds": 60, "reused": [4, 3],
            "timings": {"3": {"dense": 60.0}, "4": {"dense": 180.0}}}  # as seeds.json holds them: keys sorted, strings
    text = seeds_provenance(merged, runs, info)
    assert "seed 4 (2 torch thread(s), 3 min): dense 3.0" in text
    assert "seed 3 (1 torch thread(s), 1 min): dense 1.0" in text


def test_seeds_provenance_says_whether_the_command_trained_some_seeds_or_none():
    from visor_hf.toyworld.report import seeds_provenance

    merged = {"machine": {"cpu_count": 2, "processor": "x86_64", "torch": "2", "transformers": "5"}, "preset": "ci",
              "seeds": [4, 3], "dense": {"all": {"questions": 10}},
              "model": {"dense_num_parameters": 1e6, "num_parameters": 1e6, "num_layers": 3, "cross_attn_layers": [0],
                        "self_attn_layers": [1], "configurations": [[]]}}
    runs = [{"seed": 4, "machine": {"torch_threads": 2}}, {"seed": 3, "machine": {"torch_threads": 1}}]
    info = {"command": "c", "jobs": 1, "threads": 2, "seconds": 120, "timings": {"3": {"dense": 60.0}, "4": {"dense": 180.0}}}
    every = seeds_provenance(merged, runs, dict(info, reused=[4, 3]))
    assert "no seed trained by this command (seeds [4, 3] ran in an earlier sitting)" in every and "this sitting" not in every
    some = seeds_provenance(merged, runs, dict(info, reused=[4]))
    assert "2 min in this sitting (seeds [4] ran in an earlier sitting)" in some and "no seed trained" not in some


def test_seeds_command_refuses_repeated_seeds():
    from visor_hf.toyworld.pipeline import main

    for argv in (["seeds", "--workdir", "x", "--seeds", "0", "0"], ["seeds", "--workdir", "x", "--seeds", "0", "1", "--fresh-world-seed", "1"]):
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
            main(argv)
        assert "must differ" in err.getvalue()


def test_learning_curve_measures_the_model_it_trains(tmp_path):
    from visor_hf.toyworld.dense import load_dense
    from visor_hf.toyworld.evaluate import evaluate, summarise
    from visor_hf.toyworld.pipeline import learning_curve

    first = {"family": "count_above", "steps": 2, "images": 8}  # a curriculum: 2 steps of count_above alone
    extra = {"family": "count_left", "images": 8}  # 8 count_left-only records shuffled into the 32 mixed ones
    points = learning_curve(str(tmp_path), preset="ci", steps=4,
                            eval_every=2, questions=10, dense_first=first, dense_extra=extra)
    assert [p["step"] for p in points] == [2, 4, 6]
    info = json.loads((tmp_path / "curve.json").read_text())
    assert info["curve"] == points
    first_records = [json.loads(line) for line in open(tmp_path / "data" / "first.jsonl")]
    assert len(first_records) == 8 and {r["family"] for r in first_records} == {"count_above"}
    log = json.loads((tmp_path / "dense" / "training_log.json").read_text())
    assert [e["step"] for e in log["log_history"] if "loss" in e and e["split"] == "first"] == [1, 2]
    train_steps = [e for e in log["log_history"] if "loss" in e and e["split"] == "train"]
    assert [e["step"] for e in train_steps] == [1, 2, 3, 4]
    assert float(train_steps[-1]["epoch"]) == pytest.approx(4 / 5)  # 40 records in batches of 8: an epoch is 5 steps
    extra_records = [json.loads(line) for line in open(tmp_path / "data" / "extra.jsonl")]
    assert len(extra_records) == 8 and {r["family"] for r in extra_records} == {"count_left"}
    model, processor = load_dense(str(tmp_path / "dense"))  # the last point is the saved model's accuracy
    summary = summarise(evaluate(model, processor, world.load_split(str(tmp_path / "data"), "test"), str(tmp_path / "data")))
    assert {k: v for k, v in points[-1].items() if k != "step"} == {k: v["accuracy"] for k, v in summary.items()}
    assert set(world.FAMILIES) <= set(points[-1]) and os.path.getsize(tmp_path / "curve.png") > 1000
    assert (tmp_path / "curve.md").read_text().count("\n") == 2 + 3
