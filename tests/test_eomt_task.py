"""EoMT's method plumbing between dataset examples, its predictors, the evaluator and the metrics: the model
is replaced by an oracle that emits the ground truth as mask-classification logits (one query per
segment, confident class, +-20 mask logits), so every metric must come out perfect, and a query set
that misses or mislabels segments must lower exactly the numbers it should."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs.common import SCENES_CLASSES, SCENES_THINGS
from jaxseg.data.builders.scenes import JaxsegScenes, scenes_config
from jaxseg.data.datasets import DataConfig
from jaxseg.evaluate import Evaluator
from jaxseg.methods.eomt import EomtMethod, EomtOptimizer
from jaxseg.methods.eomt.predictors import mask_example

SIZE, QUERIES = 32, 24
MODEL = dict(encoder=dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, posemb_grid=(4, 4)),
             num_classes=SCENES_CLASSES, num_queries=QUERIES, num_query_blocks=1)


@pytest.fixture(scope="module")
def validation(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    config = scenes_config(image_size=SIZE, num_train=4, num_val=6)
    JaxsegScenes(config=config, data_dir=data_dir, num_workers=1).download_and_prepare(file_format="array_record")
    return tfds.data_source(f"jaxseg_scenes/{config.name}", data_dir=data_dir, split="validation")


def _oracle(example: dict, segmentation: str, mislabel: bool = False):
    """Class and mask logits (1, Q, K+1), (1, Q, H, W) that state the example's ground truth."""
    segments = example["segments"]
    keep = ~segments["iscrowd"] & (segments["is_thing"] if segmentation == "instance" else True)
    ids, categories = segments["id"][keep], segments["category_id"][keep]
    if mislabel:  # every thing segment called the next thing class
        categories = np.where(categories < SCENES_THINGS, (categories + 1) % SCENES_THINGS, categories)
    class_logits = np.full((QUERIES, SCENES_CLASSES + 1), -20.0, np.float32)
    class_logits[:, -1] = 20.0  # unused queries: no object
    mask_logits = np.full((QUERIES, SIZE, SIZE), -20.0, np.float32)
    for q, (segment_id, category) in enumerate(zip(ids, categories)):
        class_logits[q] = -20.0
        class_logits[q, category] = 20.0
        mask_logits[q][example["panoptic"] == segment_id] = 20.0
    return jnp.asarray(class_logits[None]), jnp.asarray(mask_logits[None])


def _method(segmentation="panoptic", num_things=SCENES_THINGS):
    return EomtMethod(model=MODEL, optimizer=EomtOptimizer(), total_steps=10, batch_size=1,
                      data=DataConfig(name="jaxseg_scenes"), crop_size=SIZE, segmentation=segmentation,
                      num_things=num_things)


def _oracle_predictor(method, kind, examples, **oracle_options):
    predictor = method.predictor(kind)
    predictor._final_logits = lambda params, images: _oracle(mask_example(next(examples)), kind, **oracle_options)
    return predictor


def _evaluate_with_oracle(validation, segmentation, **oracle_options):
    method = _method(segmentation)
    predictor = _oracle_predictor(method, segmentation, iter([validation[i] for i in range(len(validation))]),
                                  **oracle_options)
    metrics = ("semantic", "panoptic") if segmentation == "panoptic" else ("instance",)
    evaluator = Evaluator(predictor, lambda: {kind: method.metric(kind) for kind in metrics}, batch_size=1)
    # Not compiled, so that the oracle is asked for each image (in order) instead of being traced once.
    with jax.disable_jit():
        return evaluator.run(None, validation)


def test_perfect_panoptic_predictions_score_one(validation):
    results = _evaluate_with_oracle(validation, "panoptic")
    assert results["examples"] == 6
    assert results["PQ"] == pytest.approx(1.0) and results["PQ_things"] == pytest.approx(1.0)
    assert results["PQ_stuff"] == pytest.approx(1.0)
    assert results["mean_iou"] == pytest.approx(1.0) and results["pixel_accuracy"] == pytest.approx(1.0)


def test_mislabelled_things_lose_exactly_the_thing_quality(validation):
    results = _evaluate_with_oracle(validation, "panoptic", mislabel=True)
    assert results["PQ_things"] == 0.0 and results["PQ_stuff"] == pytest.approx(1.0)
    assert results["mean_iou"] < 1.0


def test_perfect_instance_predictions_score_one(validation):
    results = _evaluate_with_oracle(validation, "instance")
    assert results["AP"] == pytest.approx(1.0) and results["AP50"] == pytest.approx(1.0)
    assert "mean_iou" not in results


def test_predictions_list_the_segments_they_paint(validation):
    example = validation[0]
    predictor = _oracle_predictor(_method(), "panoptic", iter([example]))
    batch = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], predictor.prepare(example))
    with jax.disable_jit():
        outputs = jax.tree_util.tree_map(lambda x: np.asarray(x)[0], predictor.predict(None, batch))
    out = predictor.finish(outputs, example)
    example = mask_example(example)
    assert out["semantic"].shape == (SIZE, SIZE)
    assert sorted(s["id"] for s in out["segments"]) == sorted(np.unique(out["panoptic"][out["panoptic"] > 0]))
    for segment in out["segments"]:
        painted = out["panoptic"] == segment["id"]
        truth = example["semantic"][painted]
        assert np.all((truth == segment["category_id"]) | (truth == 255))
        assert segment["is_thing"] == (segment["category_id"] < SCENES_THINGS) and segment["score"] > 0.99


def test_semantic_only_examples_and_bad_settings():
    example = {"image": np.zeros((8, 8, 3), np.uint8), "semantic": np.zeros((8, 8, 1), np.uint8)}
    with pytest.raises(ValueError, match="semantic labels only: use method.segmentation='semantic'"):
        _method("panoptic").train_transform(example, np.random.default_rng(0))
    with pytest.raises(ValueError, match="segmentation must be one of"):
        _method("stuff")
    with pytest.raises(ValueError, match="num_things"):
        _method(num_things=99)


def test_empty_segment_tables_keep_their_dtypes():
    example = {"image": np.zeros((4, 4, 3), np.uint8), "semantic": np.zeros((4, 4, 1), np.uint8),
               "panoptic": np.zeros((4, 4), np.int32),
               "segments": {k: np.zeros((0,), np.float64) for k in
                            ("id", "category_id", "is_thing", "iscrowd", "area", "bbox")}}
    segments = mask_example(example)["segments"]
    assert segments["id"].dtype == np.int32 and segments["iscrowd"].dtype == bool
    assert segments["bbox"].shape == (0, 4)


def test_annealing_windows_that_end_after_the_run_are_refused():
    """A short run (`--set train.total_steps`) of a recipe with an explicit table would stop with the masks
    still on, and inference runs unmasked."""
    from jaxseg.errors import UserError
    from jaxseg.methods.eomt.method import Annealing

    settings = dict(model=MODEL, optimizer=EomtOptimizer(), batch_size=1, data=DataConfig(name="jaxseg_scenes"),
                    crop_size=SIZE, annealing=Annealing(starts=(2,), ends=(10,)))
    EomtMethod(total_steps=10, **settings)
    with pytest.raises(UserError, match=r"method.annealing ends \(10,\) go past train.total_steps 9"):
        EomtMethod(total_steps=9, **settings)
