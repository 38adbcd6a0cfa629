"""The pseudo-label rule on hand-built tables."""

import pytest

from visor_hf.training.pseudo_labels import choose_configuration, pseudo_labels, sample_label

CONFIGS = [(), (4,), (1, 4), (2, 4), (1, 2, 4)]  # cheapest first; the full one is (1, 2, 4)


def row(correct, loss, **fields):
    return {"correct": dict(zip(CONFIGS, correct)), "loss": dict(zip(CONFIGS, loss)), **fields}


def test_cheapest_configuration_that_keeps_a_correct_answer():
    rows = [row([0, 1, 1, 1, 1], [3.0, 0.9, 0.5, 0.4, 0.3])]
    assert pseudo_labels(rows, CONFIGS) == [(4,)]


def test_ties_in_layer_count_break_on_loss_then_on_listing_order():
    by_loss = row([0, 0, 1, 1, 1], [3.0, 2.0, 0.6, 0.4, 0.3])
    same_loss = row([0, 0, 1, 1, 1], [3.0, 2.0, 0.5, 0.5, 0.3])
    assert pseudo_labels([by_loss, same_loss], CONFIGS) == [(2, 4), (1, 4)]


def test_when_the_full_model_fails_the_cheapest_configuration_wins():
    rows = [row([0, 0, 0, 0, 0], [3.0, 2.0, 1.0, 1.0, 0.5])]
    assert pseudo_labels(rows, CONFIGS) == [()]


def test_nothing_but_the_full_configuration_reaches_99_percent_of_a_group():
    # Group accuracy of full = 1.0; every other configuration misses one of the two questions.
    rows = [row([1, 1, 0, 1, 1], [1, 1, 1, 1, 1], task="doc"), row([0, 0, 1, 0, 1], [1, 1, 1, 1, 1], task="doc")]
    assert pseudo_labels(rows, CONFIGS, group_by="task") == [(1, 2, 4), (1, 2, 4)]


def test_groups_are_labelled_independently_and_99_percent_is_relative():
    easy = [row([1, 1, 1, 1, 1], [0.2] * 5, task="easy") for _ in range(3)]
    # full: 100/100 correct; (2, 4): 99/100 correct reaches 99 % exactly, (1, 4) 98/100 does not.
    hard = [row([0, 0, 1, 1, 1], [2, 2, 1, 1, 1], task="hard") for _ in range(98)]
    hard += [row([0, 0, 0, 1, 1], [2, 2, 1, 1, 1], task="hard"), row([0, 0, 0, 0, 1], [2, 2, 1, 1, 1], task="hard")]
    labels = pseudo_labels(easy + hard, CONFIGS, group_by="task")
    assert labels[:3] == [()] * 3
    assert set(labels[3:]) == {(2, 4)}


def test_several_questions_run_the_most_expensive_label():
    questions = [row([1, 1, 1, 1, 1], [0.1] * 5, id="a"), row([0, 0, 0, 1, 1], [2, 2, 2, 0.5, 0.4], id="a")]
    labels = pseudo_labels(questions, CONFIGS)
    assert labels == [(), (2, 4)]
    assert sample_label(labels, CONFIGS) == (2, 4)
    assert all(label in CONFIGS for label in labels)


def test_missing_group_field_is_an_error():
    with pytest.raises(ValueError, match="group_by='task': question 0"):
        pseudo_labels([row([1] * 5, [0] * 5)], CONFIGS, group_by="task")


def test_threshold_uses_the_full_configuration_accuracy():
    accuracy = {(): 0.3, (4,): 0.79, (1, 4): 0.8, (2, 4): 0.0, (1, 2, 4): 0.8}
    loss = {c: 1.0 for c in CONFIGS}
    assert choose_configuration(accuracy, loss, CONFIGS, 0.99) == (1, 4)
    assert choose_configuration(accuracy, loss, CONFIGS, 0.5) == (4,)
