"""Loaders of the official data set files, on tiny fixtures in exactly those formats
(tests/fixtures, written by tests/fixtures/make_fixtures.py), plus easy-VQA from its package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from earlyexit.data.coco import load_karpathy, load_nocaps
from earlyexit.data.easyvqa import load_easy_vqa
from earlyexit.data.visdial import load_visdial
from earlyexit.data.vqa import load_gqa, load_okvqa, load_vizwiz, load_vqav2
from earlyexit.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures"
COCO = FIXTURES / "coco"
VQAV2_QUESTIONS = FIXTURES / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json"
VQAV2_ANNOTATIONS = FIXTURES / "vqav2/v2_mscoco_val2014_annotations.json"
OKVQA_QUESTIONS = FIXTURES / "okvqa/OpenEnded_mscoco_val2014_questions.json"
OKVQA_ANNOTATIONS = FIXTURES / "okvqa/mscoco_val2014_annotations.json"
VISDIAL_VAL = FIXTURES / "visdial/visdial_1.0_val.json"
VISDIAL_TEST = FIXTURES / "visdial/visdial_1.0_test.json"


def assert_images_load(dataset):
    for sample in dataset:
        image = sample.load_image()
        assert image.mode == "RGB" and image.size == (8, 8)


def image_path(sample) -> str:
    """The file a lazy loader will read: image_from_file keeps it in its closure."""
    (path,) = [cell.cell_contents for cell in sample.image.__closure__
               if isinstance(cell.cell_contents, str)]
    return path


# ------------------------------------------------------------------------------------ captions


def test_karpathy_splits_follow_the_restval_convention():
    train = load_karpathy(COCO / "dataset_coco.json", COCO, "train")
    assert (train.name, train.task, train.split) == ("coco-karpathy", "caption", "train")
    assert sorted(s.id for s in train) == ["184613", "57870"]  # restval joins train
    strict = load_karpathy(COCO / "dataset_coco.json", COCO, "train", restval_in_train=False)
    assert [s.id for s in strict] == ["57870"]
    assert [s.id for s in load_karpathy(COCO / "dataset_coco.json", COCO, "val")] == ["522418"]

    test = load_karpathy(COCO / "dataset_coco.json", COCO, "test")
    (sample,) = test.samples
    assert sample.id == "391895"
    assert sample.captions == ["A man rides a moped down a dirt road.", "a person on a small motorbike"]
    assert image_path(sample) == str(COCO / "val2014/COCO_val2014_000000391895.jpg")
    assert_images_load(train)
    assert_images_load(test)


def test_karpathy_flickr_file_without_filepath_or_cocoid():
    root = FIXTURES / "flickr8k/images"
    dataset = load_karpathy(FIXTURES / "flickr8k/dataset_flickr8k.json", root, "train")
    assert dataset.name == "flickr8k-karpathy"
    (sample,) = dataset.samples
    assert sample.id == "0"  # imgid stands in for the missing cocoid
    assert image_path(sample) == str(root / "1000268201_693b08cb0e.jpg")
    assert_images_load(dataset)


def test_karpathy_split_problems():
    with pytest.raises(ConfigError, match="unknown split 'restval'"):
        load_karpathy(COCO / "dataset_coco.json", COCO, "restval")
    with pytest.raises(DataError, match=r"dataset_flickr8k\.json: has no images in split 'val'"):
        load_karpathy(FIXTURES / "flickr8k/dataset_flickr8k.json", FIXTURES / "flickr8k/images", "val")


def test_images_are_not_opened_while_loading(tmp_path):
    dataset = load_karpathy(COCO / "dataset_coco.json", tmp_path, "test")  # no images there
    with pytest.raises(DataError, match="COCO_val2014_000000391895.jpg is missing"):
        dataset[0].load_image()


def test_nocaps_val_and_test():
    val = load_nocaps(FIXTURES / "nocaps/nocaps_val_4500_captions.json", FIXTURES / "nocaps/val")
    assert (val.name, val.task, val.split) == ("nocaps", "caption", "val")
    assert [s.extra["domain"] for s in val] == ["in-domain", "near-domain", "out-domain"]
    assert val[2].captions == ["A jellyfish glows in dark water.", "An orange jellyfish swimming."]
    assert val[0].extra["open_images_id"] == "0013ea2087020901"
    assert image_path(val[1]) == str(FIXTURES / "nocaps/val/002b2d0c8ac2a2a5.jpg")
    assert_images_load(val)

    near = load_nocaps(FIXTURES / "nocaps/nocaps_val_4500_captions.json", FIXTURES / "nocaps/val",
                       domain="near-domain")
    assert [s.id for s in near] == ["1"]

    test = load_nocaps(FIXTURES / "nocaps/nocaps_test_image_info.json", FIXTURES / "nocaps/test",
                       "test")
    assert len(test) == 1 and test[0].captions == []
    assert_images_load(test)


def test_nocaps_val_needs_captions():
    with pytest.raises(DataError, match=r"nocaps_test_image_info\.json: the top level has no "
                                        r"'annotations' list; is this nocaps_val_4500"):
        load_nocaps(FIXTURES / "nocaps/nocaps_test_image_info.json", FIXTURES / "nocaps/test", "val")


# ----------------------------------------------------------------------------------------- VQA


def test_vqav2_val_with_annotations():
    dataset = load_vqav2(VQAV2_QUESTIONS, VQAV2_ANNOTATIONS, COCO / "val2014", "val")
    assert (dataset.name, dataset.task, dataset.split, len(dataset)) == ("vqav2", "vqa", "val", 3)
    sample = dataset[0]
    assert sample.id == "391895000" and sample.question == "What is the man riding?"
    assert len(sample.answers) == 10 and sample.answers.count("moped") == 6
    assert sample.extra["question_type"] == "what is the man"
    assert sample.extra["answer_type"] == "other"
    assert sample.extra["multiple_choice_answer"] == "moped"
    assert image_path(sample) == str(COCO / "val2014/COCO_val2014_000000391895.jpg")
    assert_images_load(dataset)


def test_vqav2_test_dev_has_no_answers_and_uses_test2015_images():
    questions = FIXTURES / "vqav2/v2_OpenEnded_mscoco_test-dev2015_questions.json"
    dataset = load_vqav2(questions, None, COCO / "test2015")
    assert dataset.split == "test-dev2015"
    assert dataset[0].answers == []
    assert image_path(dataset[0]).endswith("COCO_test2015_000000000001.jpg")
    assert_images_load(dataset)


def test_vqa_questions_and_annotations_must_match(tmp_path):
    annotations = json.loads(VQAV2_ANNOTATIONS.read_text())
    del annotations["annotations"][2]
    path = write(tmp_path / "v2_mscoco_val2014_annotations.json", annotations)
    with pytest.raises(DataError, match="has no annotation for question_id 522418000"):
        load_vqav2(VQAV2_QUESTIONS, path, COCO / "val2014")
    annotations["data_subtype"] = "train2014"
    write(path, annotations)
    with pytest.raises(DataError, match="holds train2014 annotations but the questions are val2014"):
        load_vqav2(VQAV2_QUESTIONS, path, COCO / "val2014")


def test_okvqa_uses_processed_answers():
    dataset = load_okvqa(OKVQA_QUESTIONS, OKVQA_ANNOTATIONS, COCO / "val2014")
    assert (dataset.name, len(dataset)) == ("okvqa", 2)
    assert dataset[0].answers == ["cow"] * 4 + ["calf"] * 2 + ["cow"] * 4  # not raw "cows"
    assert "Birthday" not in dataset[1].answers
    assert_images_load(dataset)


def test_vizwiz_val_and_test():
    val = load_vizwiz(FIXTURES / "vizwiz/val.json", FIXTURES / "vizwiz/val", "val")
    assert [s.id for s in val] == ["VizWiz_val_00000000", "VizWiz_val_00000001"]
    assert len(val[0].answers) == 10 and val[0].answers[-1] == "tomato soup"
    assert val[1].extra == {"image_name": "VizWiz_val_00000001.jpg",
                            "answer_type": "unanswerable", "answerable": 0}
    assert_images_load(val)
    test = load_vizwiz(FIXTURES / "vizwiz/test.json", FIXTURES / "vizwiz/test", "test")
    assert len(test) == 1 and test[0].answers == []
    assert_images_load(test)


def test_gqa_testdev_and_test():
    dataset = load_gqa(FIXTURES / "gqa/testdev_balanced_questions.json", FIXTURES / "gqa/images",
                       "testdev")
    assert [s.id for s in dataset] == ["20968379", "20968380"]
    assert dataset[1].answers == ["white"]
    assert dataset[1].extra == {"image_id": "n161313", "full_answer": "The bus is white."}
    assert image_path(dataset[0]) == str(FIXTURES / "gqa/images/n288870.jpg")
    assert_images_load(dataset)
    test = load_gqa(FIXTURES / "gqa/test_balanced_questions.json", FIXTURES / "gqa/images", "test")
    assert test[0].answers == [] and test[0].extra["full_answer"] is None
    assert_images_load(test)


# ---------------------------------------------------------------------------------------- VisDial


def test_visdial_val_has_one_sample_per_round():
    dataset = load_visdial(VISDIAL_VAL, FIXTURES / "visdial/VisualDialog_val2018", "val")
    assert (dataset.name, dataset.task, len(dataset)) == ("visdial", "dialog", 4)
    assert [s.id for s in dataset] == ["185565_1", "185565_2", "284024_1", "284024_2"]
    second = dataset[1]
    assert second.question == "what color is the dog?" and second.answers == ["white"]
    assert len(second.extra["options"]) == 100
    assert second.extra["options"][second.extra["gt_index"]] == "white"
    assert second.extra["history"] == [("is it a photo?", "yes")]
    assert (second.extra["caption"], second.extra["round"]) == ("a dog on a lawn", 2)
    assert image_path(second).endswith("VisualDialog_val2018_000000185565.jpg")
    assert_images_load(dataset)


def test_visdial_test_keeps_only_the_last_round():
    dataset = load_visdial(VISDIAL_TEST, FIXTURES / "visdial/VisualDialog_test2018", "test")
    assert [s.id for s in dataset] == ["568676_3", "1_1"]
    last = dataset[0]
    assert last.answers == [] and last.extra["gt_index"] is None
    assert last.extra["history"] == [("is it daytime?", "yes"), ("where is it?", "outside")]
    assert len(last.extra["options"]) == 100
    assert dataset[1].extra["history"] == []
    assert_images_load(dataset)


def test_visdial_train_image_patterns(tmp_path):
    data = json.loads(VISDIAL_VAL.read_text())
    data["split"] = "train"
    path = write(tmp_path / "visdial_1.0_train.json", data)
    (tmp_path / "val2014").mkdir()
    source = FIXTURES / "visdial/VisualDialog_val2018/VisualDialog_val2018_000000185565.jpg"
    (tmp_path / "val2014/COCO_val2014_000000185565.jpg").write_bytes(source.read_bytes())

    dataset = load_visdial(path, tmp_path, "train")  # COCO train2014/, then val2014/
    assert dataset[0].load_image().size == (8, 8)
    with pytest.raises(DataError, match="none of .*train2014/COCO_train2014_000000284024.jpg"):
        dataset[2].load_image()

    custom = load_visdial(path, tmp_path, "train", image_pattern="val2014/COCO_val2014_{image_id:012d}.jpg")
    assert custom[0].load_image().size == (8, 8)
    with pytest.raises(ConfigError, match="image_pattern"):
        load_visdial(path, tmp_path, "train", image_pattern="{imageid}.jpg")


def test_visdial_checks_the_split_and_the_indices(tmp_path):
    with pytest.raises(DataError, match="holds the 'test' split, not 'val'"):
        load_visdial(VISDIAL_TEST, FIXTURES / "visdial/VisualDialog_test2018", "val")
    data = json.loads(VISDIAL_VAL.read_text())
    data["data"]["dialogs"][1]["dialog"][0]["question"] = 99
    path = write(tmp_path / "visdial_1.0_val.json", data)
    with pytest.raises(DataError, match=r"dialog 1 round 1 refers to questions 99, outside "
                                        r"data\.questions \(0\.\.5\)"):
        load_visdial(path, FIXTURES / "visdial/VisualDialog_val2018", "val")


# --------------------------------------------------------------------------------------- easy-VQA


def test_easy_vqa_splits():
    import easy_vqa

    train, val, test = (load_easy_vqa(split) for split in ("train", "val", "test"))
    assert len(train) + len(val) == len(easy_vqa.get_train_questions()[0])
    assert len(test) == len(easy_vqa.get_test_questions()[0])
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.15

    train_images = {s.extra["image_id"] for s in train}
    val_images = {s.extra["image_id"] for s in val}
    assert train_images.isdisjoint(val_images)
    assert len(val_images) == 400  # 10% of the 4000 training images

    ids = [s.id for dataset in (train, val, test) for s in dataset]
    assert len(ids) == len(set(ids))
    assert [s.id for s in load_easy_vqa("val")] == [s.id for s in val]  # deterministic

    sample = test[0]
    assert (test.task, sample.answers) == ("vqa", [sample.answers[0]] * 10)
    assert sample.load_image().mode == "RGB"
    with pytest.raises(ConfigError):
        load_easy_vqa("dev")


# ------------------------------------------------------------------------------ malformed files


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def karpathy(path):
    return load_karpathy(path, COCO, "test")


def nocaps(path):
    return load_nocaps(path, FIXTURES / "nocaps/val")


def vqav2_questions(path):
    return load_vqav2(path, VQAV2_ANNOTATIONS, COCO / "val2014")


def vqav2_annotations(path):
    return load_vqav2(VQAV2_QUESTIONS, path, COCO / "val2014")


def okvqa_questions(path):
    return load_okvqa(path, OKVQA_ANNOTATIONS, COCO / "val2014")


def vizwiz(path):
    return load_vizwiz(path, FIXTURES / "vizwiz/val", "val")


def gqa(path):
    return load_gqa(path, FIXTURES / "gqa/images", "testdev")


def visdial(path):
    return load_visdial(path, FIXTURES / "visdial/VisualDialog_val2018", "val")


def set_item(keys, value):
    def mutate(data):
        for key in keys[:-1]:
            data = data[key]
        data[keys[-1]] = value
    return mutate


def delete_item(keys):
    def mutate(data):
        for key in keys[:-1]:
            data = data[key]
        del data[keys[-1]]
    return mutate


MALFORMED = [  # loader, fixture, change, what the message must say
    (karpathy, "coco/dataset_coco.json", set_item(["images"], {}),
     "the top level field 'images' should be a list, not object; is this Karpathy's"),
    (karpathy, "coco/dataset_coco.json", delete_item(["images", 0, "sentences"]),
     "image 0 has no 'sentences' list; is this Karpathy's dataset_coco.json"),
    (karpathy, "coco/dataset_coco.json", set_item(["images", 0, "sentences", 1, "raw"], 3),
     "image 0 sentence 1 field 'raw' should be a string, not integer"),
    (nocaps, "nocaps/nocaps_val_4500_captions.json", delete_item(["images", 1, "domain"]),
     "image 1 has no 'domain' string"),
    (nocaps, "nocaps/nocaps_val_4500_captions.json", set_item(["annotations", 0], "caption"),
     "annotation 0 should be an object, not string"),
    (vqav2_questions, "vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
     set_item(["questions"], None), "the top level field 'questions' should be a list, not null"),
    (vqav2_questions, "vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
     set_item(["questions", 1, "image_id"], "391895"),
     "question 1 field 'image_id' should be an integer, not string"),
    (vqav2_annotations, "vqav2/v2_mscoco_val2014_annotations.json",
     delete_item(["annotations", 0, "answers", 3, "answer"]), "annotation 0 answer 3 has no 'answer'"),
    (okvqa_questions, "okvqa/OpenEnded_mscoco_val2014_questions.json",
     set_item(["questions", 1, "question_id"], 1.5),
     "question 1 field 'question_id' should be an integer or string, not number"),
    (vizwiz, "vizwiz/val.json", set_item([0], {"images": []}),
     "entry 0 has no 'image' string"),
    (vizwiz, "vizwiz/val.json", delete_item([0, "answers"]), "entry 0 has no 'answers' list"),
    (gqa, "gqa/testdev_balanced_questions.json", delete_item(["20968380", "imageId"]),
     "question 20968380 has no 'imageId' string or integer"),
    (visdial, "visdial/visdial_1.0_val.json", set_item(["data", "dialogs"], {}),
     "the 'data' object field 'dialogs' should be a list, not object"),
    (visdial, "visdial/visdial_1.0_val.json",
     set_item(["data", "dialogs", 0, "dialog", 1, "gt_index"], "3"),
     "dialog 0 round 2 field 'gt_index' should be an integer, not string"),
]


@pytest.mark.parametrize("loader, fixture, change, message", MALFORMED,
                         ids=[f"{case[0].__name__}-{n}" for n, case in enumerate(MALFORMED)])
def test_malformed_files_raise_one_line_data_errors(tmp_path, loader, fixture, change, message):
    data = json.loads((FIXTURES / fixture).read_text())
    change(data)
    path = write(tmp_path / Path(fixture).name, data)
    with pytest.raises(DataError) as error:
        loader(path)
    text = str(error.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


LOADERS = [karpathy, nocaps, vqav2_questions, vqav2_annotations, okvqa_questions, vizwiz, gqa,
           visdial]


@pytest.mark.parametrize("loader", LOADERS, ids=[loader.__name__ for loader in LOADERS])
def test_missing_and_broken_files(tmp_path, loader):
    missing = tmp_path / "nowhere.json"
    with pytest.raises(DataError, match=f"^{missing}: file not found; download "):
        loader(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(DataError, match=f"^{broken}: is not valid JSON"):
        loader(broken)
    with pytest.raises(DataError, match="should be"):  # valid JSON, wrong shape
        loader(write(tmp_path / "scalar.json", 42))


def test_missing_image_folder(tmp_path):
    with pytest.raises(DataError, match=f"^{tmp_path / 'absent'}: image folder not found"):
        load_vizwiz(FIXTURES / "vizwiz/val.json", tmp_path / "absent", "val")
