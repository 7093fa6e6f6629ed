"""``python -m data_shards concepts`` and ``filter`` on a small synthetic world, with a real (tiny, random) scorer
saved as this project's export would save it; the chosen concepts and kept pairs are checked against scores
computed directly from the scorer; killed runs resume; ``build`` keeps the concepts in every format.

Run: ``.venv/bin/python -m pytest -q tests/data_shards/test_concepts.py``.
"""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import save_file

from data_shards.__main__ import main as data_shards_main
from data_shards.concepts import image_sample, precision_at_k, read_records
from data_shards.nouns import noun_vocabulary, nouns
from data_shards.reader import ShardReader
from data_shards.transforms import PilTransform
from pretrain.models.albef import to_albef_state_dict
from pretrain.scorer import load_scorer
from tests.pretrain.conftest import TINY_MODEL
from tests.pretrain.vicha_helpers import tiny_backbone


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    assert data_shards_main(["synth", "--out", str(root / "world"), "--num-images", "40", "--seed", "1"]) == 0
    model, _ = tiny_backbone(depth=2, text_layers=2, seed=5)
    scorer_path = root / "scorer.safetensors"
    save_file({name: value.contiguous().clone() for name, value in to_albef_state_dict(model.state_dict()).items()},
              str(scorer_path))
    model_section = dict(TINY_MODEL, vision_overrides=dict(TINY_MODEL["vision_overrides"], depth=2),
                         text_overrides=dict(TINY_MODEL["text_overrides"], num_hidden_layers=3), fusion_layer=2)
    (root / "scorer.yaml").write_text(yaml.safe_dump({"model": model_section}))
    return root


def test_rule_based_nouns_take_the_head_of_each_phrase():
    assert nouns("A large red circle left of two blue squares.") == ["circle", "squares"]
    assert nouns("a man riding a horse next to a tall building") == ["man", "horse", "building"]
    assert nouns("a large square in orange, on a plain background") == ["square", "orange", "background"]
    assert noun_vocabulary(["a red circle", "a blue circle", "the square", "a cat"], min_count=2) == ["circle"]
    assert noun_vocabulary(["a cat", "a dog", "a dog"], min_count=1) == ["dog", "cat"]


def test_precision_at_k_counts_true_words_among_the_first_k():
    chosen = {"a": ["circle", "reds", "x", "y", "z", "square"], "b": ["squares", "blue", "q", "r", "s"]}
    truth = {"a": {"circle", "red", "square"}, "b": {"square", "blue"}}
    result = precision_at_k(chosen, truth, k=5)
    assert result["precision_at_5"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert result["images_recovered"] == 0.5


def _expected_concepts(world, records, vocabulary, k=15):
    scorer = load_scorer(str(world / "scorer.safetensors"))
    render = PilTransform(scorer_transform(scorer))
    words = scorer.text_features(vocabulary)
    result = {}
    for record in records:
        data = (world / "world" / "images" / record["image"]).read_bytes()
        image = render(image_sample(record["image"], data))["image"][None]
        similarity = (scorer.image_features(image) @ words.T)[0]
        result[record["image"]] = [vocabulary[i] for i in similarity.topk(min(k, len(vocabulary))).indices]
    return result


def scorer_transform(scorer):
    from data_shards.boxes import TransformConfig

    return TransformConfig(image_size=scorer.image_size, train=False)


def test_concepts_are_the_scorers_top_k_vocabulary_words_and_a_killed_run_resumes(world, tmp_path):
    annotations = world / "world" / "annotations"
    output = tmp_path / "retrieval_val_kw.json"
    arguments = ["concepts", "--captions", str(annotations / "retrieval_train.json"), "--min-count", "2",
                 "--vocabulary-out", str(tmp_path / "vocabulary.json"), "--checkpoint",
                 str(world / "scorer.safetensors"), "--input", str(annotations / "retrieval_val.json"),
                 "--output", str(output), "--image-root", str(world / "world" / "images"), "--top-k", "5",
                 "--batch-size", "3"]
    # A killed run left one image done; the re-run keeps it and scores only the others.
    records = read_records(str(annotations / "retrieval_val.json"))
    output.with_name(output.name + ".progress.jsonl").write_text(
        json.dumps({"key": records[0]["image"], "value": ["kept", "from", "before"]}) + "\n" + '{"key": "cut')
    assert data_shards_main(arguments) == 0
    vocabulary = json.loads((tmp_path / "vocabulary.json").read_text())
    captions = [record["caption"] for record in read_records(str(annotations / "retrieval_train.json"))]
    assert vocabulary == noun_vocabulary(captions, 2) and "circle" in vocabulary
    written = read_records(str(output))
    assert written[0]["kwords"] == ["kept", "from", "before"]
    expected = _expected_concepts(world, records[1:], vocabulary, k=5)
    assert {record["image"]: record["kwords"] for record in written[1:]} == expected
    assert not output.with_name(output.name + ".progress.jsonl").exists()

    # NLVR2 pairs get one list per image, and build keeps them as json.concepts.
    nlvr2 = tmp_path / "nlvr2_val_kw.json"
    assert data_shards_main(["concepts", "--vocabulary", str(tmp_path / "vocabulary.json"), "--checkpoint",
                             str(world / "scorer.safetensors"), "--input", str(annotations / "nlvr2_val.json"),
                             "--output", str(nlvr2), "--image-root", str(world / "world" / "images"),
                             "--top-k", "4"]) == 0
    pair = read_records(str(nlvr2))[0]
    assert len(pair["kwords1"]) == 4 and len(pair["kwords2"]) == 4
    for name, fmt in ((nlvr2, "nlvr2"), (output, "coco")):
        shards = tmp_path / f"{fmt}_shards"
        assert data_shards_main(["build", "--input", str(name), "--format", fmt, "--image-root",
                                 str(world / "world" / "images"), "--output", str(shards / "s-%06d.tar"),
                                 "--samples-per-shard", "100", "--workers", "1"]) == 0
        sample = next(iter(ShardReader(str(shards / "s-000000.tar"), rank=0, world_size=1, shard_shuffle=False)))
        concepts = sample["json"]["concepts"]
        assert (concepts == [pair["kwords1"], pair["kwords2"]] if fmt == "nlvr2"
                else concepts in [record["kwords"] for record in written])


def test_concepts_rewrite_shards_keeping_every_member_and_skip_finished_ones(world, tmp_path):
    shards = tmp_path / "in"
    assert data_shards_main(["build", "--input", str(world / "world" / "annotations" / "retrieval_val.json"),
                             "--format", "coco", "--image-root", str(world / "world" / "images"), "--output",
                             str(shards / "val-%06d.tar"), "--samples-per-shard", "2", "--workers", "1"]) == 0
    pattern = str(shards / "val-{000000..000001}.tar")
    arguments = ["concepts", "--captions", pattern, "--min-count", "1", "--checkpoint",
                 str(world / "scorer.safetensors"), "--input", pattern, "--output", str(tmp_path / "out"),
                 "--top-k", "3"]
    assert data_shards_main(arguments) == 0
    before = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "out").glob("*.tar")}
    assert sorted(before) == ["val-000000.tar", "val-000001.tar"]
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"val-000000.tar": 2, "val-000001.tar": 2}
    original = list(ShardReader(pattern, rank=0, world_size=1, shard_shuffle=False))
    rewritten = list(ShardReader(str(tmp_path / "out" / "val-{000000..000001}.tar"), rank=0, world_size=1,
                                 shard_shuffle=False))
    for old, new in zip(original, rewritten, strict=True):
        assert new["jpg"] == old["jpg"] and new["txt"] == old["txt"]
        assert {**new["json"], "concepts": None} == {**old["json"], "concepts": None}
        assert len(new["json"]["concepts"]) == 3
    (tmp_path / "out" / "val-000001.tar").unlink()
    assert data_shards_main(arguments) == 0           # the killed run's finished shard is not rewritten
    assert (tmp_path / "out" / "val-000000.tar").stat().st_mtime_ns == before["val-000000.tar"]
    assert (tmp_path / "out" / "val-000001.tar").exists()


def test_filter_keeps_the_best_pairs_per_dataset_or_per_image_and_resumes(world, tmp_path):
    annotations = world / "world" / "annotations"
    source = read_records(str(annotations / "retrieval_val.json"))      # 4 images x 5 captions
    source[1] = {**source[1], "caption": source[1]["caption"][0]}         # one image with a single caption
    (tmp_path / "pairs.json").write_text(json.dumps(source))
    scorer = load_scorer(str(world / "scorer.safetensors"))
    render = PilTransform(scorer_transform(scorer))
    scores = {}
    for index, record in enumerate(source):
        data = (world / "world" / "images" / record["image"]).read_bytes()
        image = scorer.image_features(render(image_sample(record["image"], data))["image"][None])
        captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
        for position, value in enumerate((image @ scorer.text_features(captions).T)[0].tolist()):
            scores[(index, position)] = value

    def run(*extra):
        output = tmp_path / f"out{len(list(tmp_path.glob('out*')))}.json"
        assert data_shards_main(["filter", "--input", str(tmp_path / "pairs.json"), "--output", str(output),
                                 "--checkpoint", str(world / "scorer.safetensors"), "--image-root",
                                 str(world / "world" / "images"), "--batch-size", "4", *extra]) == 0
        return read_records(str(output))

    kept = run("--keep", "0.5")
    best = sorted(scores, key=lambda pair: -scores[pair])[:int(0.5 * len(scores))]
    assert sum(len(record["caption"]) if isinstance(record["caption"], list) else 1 for record in kept) == len(best)
    for record in kept:
        index = next(i for i, old in enumerate(source) if old["image"] == record["image"])
        original = source[index]["caption"]
        captions = original if isinstance(original, list) else [original]
        texts = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
        assert {(index, captions.index(text)) for text in texts} <= set(best)

    per_image = run("--keep", "0.5", "--per-image")
    assert [record["image"] for record in per_image] == [record["image"] for record in source]  # every image
    assert per_image[1]["caption"] == source[1]["caption"]
    for index, record in enumerate(per_image):
        if isinstance(record["caption"], list):
            ranked = sorted(range(5), key=lambda position: -scores[(index, position)])[:2]
            assert record["caption"] == [source[index]["caption"][position] for position in sorted(ranked)]
            assert record["sim"] == pytest.approx([scores[(index, position)] for position in sorted(ranked)],
                                                  abs=1e-5)

    # A killed run's scores are reused: a planted score decides what the re-run keeps.
    output = tmp_path / "resumed.json"
    output.with_name(output.name + ".progress.jsonl").write_text(json.dumps({"key": "0:4", "value": 99.0}) + "\n")
    assert data_shards_main(["filter", "--input", str(tmp_path / "pairs.json"), "--output", str(output), "--keep",
                             "0.1", "--checkpoint", str(world / "scorer.safetensors"), "--image-root",
                             str(world / "world" / "images")]) == 0
    assert read_records(str(output)) == [{**source[0], "caption": [source[0]["caption"][4]], "sim": [99.0]}]


def test_bad_arguments_are_named(world, tmp_path, capsys):
    assert data_shards_main(["concepts", "--checkpoint", "x", "--input", "a.json"]) == 2
    assert "one --output per --input" in capsys.readouterr().err
    assert data_shards_main(["filter", "--input", "a.json", "--output", "b.json", "--keep", "1.5",
                             "--checkpoint", "x"]) == 2
    assert "--keep 1.5" in capsys.readouterr().err
    (tmp_path / "words.json").write_text('{"not": "a list"}')
    assert data_shards_main(["concepts", "--vocabulary", str(tmp_path / "words.json"), "--checkpoint", "x",
                             "--input", "a.json", "--output", "b.json"]) == 2
    assert "must hold a JSON list of words" in capsys.readouterr().err
    assert data_shards_main(["concepts", "--captions", str(world / "world" / "annotations" / "retrieval_train.json"),
                             "--checkpoint", str(tmp_path / "missing"), "--input", "a.json", "--output", "b.json"]) == 2
    assert "--checkpoint: checkpoint" in capsys.readouterr().err
