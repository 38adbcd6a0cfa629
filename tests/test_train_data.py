"""Training inputs are checked before the first step (issue 17), and the trainer asks the model what is new (issue 13).

- `load_records` parses every record, resolves every image and requires an answer turn; the bad records come back
  in one error with their line numbers and ids.
- Router labels accept a configuration's layers in any order; a label that is no configuration names the allowed ones.
- `set_trainable` takes VISOR's new parameters from `model.new_parameters()` and the router from its module.
"""

import json
from pathlib import Path

import pytest
from PIL import Image

import visor_hf.train as train_module
import visor_hf.training.trainer as trainer_module
from visor_hf import VisorForConditionalGeneration
from visor_hf.configuration_visor import HUB_CODE_FILES
from visor_hf.train import read_router_labels
from visor_hf.training.data import MAX_REPORTED, load_records
from visor_hf.training.pseudo_labels import configuration_index, sample_label
from visor_hf.training.trainer import set_trainable
from visor_hf.testing import tiny_llava_onevision


def turns(*pairs):
    return [{"from": speaker, "value": text} for speaker, text in pairs]


GOOD = {"id": "good", "image": "a.png", "conversations": turns(("human", "<image>\nq?"), ("gpt", "a"))}
TEXT_ONLY = {"id": "text", "conversations": turns(("human", "hi?"), ("gpt", "ok"))}


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (20, 20)).save(folder / "a.png")
    return folder


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_good_records_load_with_every_column(tmp_path, images):
    dataset = load_records(write_jsonl(tmp_path / "data.jsonl", [GOOD, TEXT_ONLY]), str(images))
    assert len(dataset) == 2 and dataset[1]["image"] is None and dataset[0]["image"] == "a.png"
    assert dataset[0]["conversations"][1] == {"from": "gpt", "value": "a"}
    (tmp_path / "data.json").write_text(json.dumps([GOOD, TEXT_ONLY]))  # a JSON list works the same
    assert load_records(str(tmp_path / "data.json"), str(images))[0]["id"] == "good"


def test_every_bad_record_is_reported_at_once_with_line_and_id(tmp_path, images):
    lines = [
        GOOD,                                                                          # line 1
        {"id": "no-answer", "conversations": turns(("human", "q?"))},                 # line 2
        '{"id": "broken", "conversations": [',                                        # line 3
        {"id": "lost", "image": "nowhere.png", "conversations": GOOD["conversations"]},  # line 4
        {"id": "who", "conversations": turns(("robot", "q?"), ("gpt", "a"))},         # line 5
        {"id": "marked", "conversations": turns(("human", "<image>\nq?"), ("gpt", "a"))},  # line 6
        ["not", "a", "record"],                                                       # line 7
        {"id": "empty", "conversations": []},                                         # line 8
        TEXT_ONLY,                                                                    # line 9
    ]
    with pytest.raises(ValueError) as error:
        load_records(write_jsonl(tmp_path / "data.jsonl", lines), str(images))
    message = str(error.value)
    assert "data.jsonl: 7 of 9 records cannot be trained on" in message
    assert "line 2 (id 'no-answer'): no answer turn" in message
    assert "line 3: not JSON" in message
    assert "line 4 (id 'lost'): image " in message and "nowhere.png not found" in message
    assert "line 5 (id 'who'): turn 0 has unknown speaker 'robot'" in message
    assert "line 6 (id 'marked'): <image> in its text but no 'image' field" in message
    assert f"... and {7 - MAX_REPORTED} more" in message and "line 8" not in message  # the first few, in file order


def test_malformed_json_list_names_its_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b",,}\n]\n')
    with pytest.raises(ValueError, match=r"data\.json: 1 of 1 records cannot be trained on.*\n  line 3: not JSON"):
        load_records(str(path), "")


def test_images_are_left_unchecked_without_an_image_folder(tmp_path):
    """`image_folder=None` (library callers that resolve images themselves): the other checks still run."""
    lost = {**GOOD, "image": "nowhere.png"}
    assert load_records(write_jsonl(tmp_path / "data.jsonl", [lost]), None)[0]["image"] == "nowhere.png"
    with pytest.raises(ValueError, match=r"line 1 \(id 'no-answer'\): no answer turn"):
        load_records(write_jsonl(tmp_path / "bad.jsonl", [{"id": "no-answer", "conversations": turns(("human", "q"))}]))


def test_empty_and_absent_files(tmp_path):
    with pytest.raises(ValueError, match=r"holds no records"):
        load_records(write_jsonl(tmp_path / "empty.jsonl", []), "")
    with pytest.raises(FileNotFoundError, match=r"data file .*absent\.jsonl does not exist"):
        load_records(str(tmp_path / "absent.jsonl"), "")


def test_training_command_checks_the_data_before_loading_the_model(tmp_path, images):
    """The model path does not exist: the data error comes first (no model load, no step)."""
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD, {"id": "no-answer", "conversations": turns(("human", "q?"))}])
    for stage in ("stage1", "universal"):
        with pytest.raises(ValueError, match=r"line 2 \(id 'no-answer'\): no answer turn"):
            train_module.main([stage, "--model", str(tmp_path / "no-model"), "--data", data, "--image_folder",
                               str(images), "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    with pytest.raises(ValueError, match=r"line 1 \(id 'good'\): image a\.png not found \(no --image_folder given\)"):
        train_module.main(["search", "--model", str(tmp_path / "no-model"), "--data", data, "--output_dir",
                           str(tmp_path / "out")])


# --------------------------------------------------------------------------------------------------
# Router labels
# --------------------------------------------------------------------------------------------------

CONFIGURATIONS = [[], [4], [1, 4]]


@pytest.mark.parametrize("label, index", [([4, 1], 2), ([1, 4], 2), ((4,), 1), ([], 0)])
def test_a_configurations_layers_in_any_order(label, index):
    assert configuration_index(label, CONFIGURATIONS) == index


@pytest.mark.parametrize("label", [[1], [4, 4], [1, 4, 7], ["x"], None])
def test_a_label_that_is_no_configuration_names_the_allowed_ones(label):
    with pytest.raises(ValueError, match=r"is not one of the model's configurations; allowed \(layers in any order\): "
                                         r"\[\], \[4\], \[1, 4\]"):
        configuration_index(label, CONFIGURATIONS)


def test_sample_label_runs_the_most_expensive_question_in_any_order():
    assert sample_label([[4, 1], []], CONFIGURATIONS) == (1, 4)
    assert sample_label([[4], []], CONFIGURATIONS) == (4,)


def test_label_file_is_checked_line_by_line(tmp_path):
    good = {"id": "a", "question_labels": [[4, 1], []]}
    path = write_jsonl(tmp_path / "labels.jsonl", [good, {"id": "b", "question_labels": [[2]]}, "{oops", {"id": "c"}])
    with pytest.raises(ValueError) as error:
        read_router_labels(path, CONFIGURATIONS)
    message = str(error.value)
    assert "labels.jsonl: 3 bad lines" in message
    assert "line 2 (id 'b'): label [2] is not one of the model's configurations; allowed" in message
    assert "line 3: not JSON" in message and "line 4: expected {'id': ..., 'question_labels'" in message
    assert read_router_labels(write_jsonl(tmp_path / "ok.jsonl", [good]), CONFIGURATIONS) == {"a": [2, 0]}


# --------------------------------------------------------------------------------------------------
# What each stage trains comes from the model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def visor():
    return VisorForConditionalGeneration.from_llava_onevision(
        tiny_llava_onevision(), cross_attn_layers=[1, 3, 5], self_attn_layers=[1, 4], routing_token_id=255
    )


def names(model, module):
    ids = {id(p) for p in module.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_stages_train_what_the_model_says(visor):
    new = set(visor.new_parameters())
    router = names(visor, visor.model.router)
    vision = names(visor, visor.model.vision_tower)
    embeddings = {n for n, p in visor.named_parameters() if p is visor.get_input_embeddings().weight}
    everything = {n for n, _ in visor.named_parameters()}
    assert router and router <= new and any(".cross_attn." in n for n in new)
    assert set(set_trainable(visor, "stage1")) == (new - router) | embeddings
    assert set(set_trainable(visor, "router")) == router
    assert set(set_trainable(visor, "universal")) == everything - router - vision
    assert set(set_trainable(visor, "universal", train_vision_tower=True)) == everything - router
    with pytest.raises(ValueError, match=r"stage='stage2'; allowed: \('stage1', 'universal', 'router'\)"):
        set_trainable(visor, "stage2")


def test_a_new_module_is_trained_without_a_name_pattern(visor):
    """A packing layer (VISOR-TR) is new: stage1 trains it because the model lists it, not because of its name."""
    from visor_hf.modeling_visor import VisorTokenPacker

    model = VisorForConditionalGeneration(visor.config)
    model.model.token_packer = VisorTokenPacker(visor.config.text_config.hidden_size, 2)
    assert "model.token_packer.weight" in set_trainable(model, "stage1")
    assert not hasattr(trainer_module, "new_part") and not hasattr(train_module, "HUB_FILES")


def test_every_stage_folder_carries_the_hub_code_files(visor, tmp_path):
    """`save_folder` relies on the model's `save_pretrained` for the code files (their one list: HUB_CODE_FILES)."""
    from visor_hf.testing import tiny_processor

    train_module.save_folder(visor, tiny_processor(visor.config), str(tmp_path / "out"))
    for name in HUB_CODE_FILES:
        assert (tmp_path / "out" / name).read_bytes() == (Path(train_module.__file__).parent / name).read_bytes()
