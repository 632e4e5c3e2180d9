"""The VLM stages' text helpers (richpref/tasks/vlm_text.py) on fixed strings: lists, content words and
grounding, edit targets, "no issues". Random-weight models cannot write a bullet list, a "No issues."
or an instruction about an apple, so every rule is pinned down here; the stages that use them are in
tests/tasks/."""
from __future__ import annotations

import pytest

from richpref.tasks.vlm_text import (
    ListParseError,
    content_words,
    grounding,
    instruction_target,
    parse_list,
    says_no_issues,
)


class TestParseList:
    def test_bullets_numbers_and_prose_around_them(self):
        text = "Here are the edits:\n- Remove the hand.\n2) Make the sky blue\n\u2022 \"Add a boat\"\nStep 4: Fix the sign\nHope this helps!"
        assert parse_list(text) == ["Remove the hand.", "Make the sky blue", "Add a boat", "Fix the sign"]

    def test_plain_lines_when_nothing_is_marked(self):
        assert parse_list("Remove the hand\n\n  Make the sky blue  \n") == ["Remove the hand", "Make the sky blue"]

    def test_json_array_in_a_fence(self):
        assert parse_list('```json\n["Remove the hand", " ", "Add a boat"]\n```') == ["Remove the hand", "Add a boat"]

    @pytest.mark.parametrize("text", ['["Remove the hand", "Add', '[1, 2]', '[{"a": 1}]'])
    def test_broken_json_is_an_error(self, text):
        with pytest.raises(ListParseError):
            parse_list(text)

    def test_empty(self):
        assert parse_list("") == [] and parse_list("  \n ") == [] and parse_list(None) == []


class TestContentWords:
    def test_function_words_and_edit_vocabulary_are_left_out(self):
        assert content_words("Change the colour of the apples to red, on the left side") == {"apple", "red"}

    def test_plurals_and_possessives_fold(self):
        assert content_words("boxes dogs' cherries dog's glass") == {"box", "dog", "cherry", "glass"}

    def test_verb_forms_fold(self):
        """-ing and -ed forms ground their verb: 'smile' is in a prompt that says 'smiling'."""
        assert content_words("smiling smiled smiles smile") == {"smile"}
        assert content_words("running hopping raining opening dressed falling") == {
            "run", "hop", "rain", "open", "dress", "fall"}
        assert content_words("a red bed, speed, string") == {"red", "bed", "speed", "string"}  # not suffixes
        assert grounding("Make the girl smile", "a girl smiling at the camera") == 1.0
        assert grounding("Show the dog running", "a dog runs in a park") == 1.0

    def test_grounding_share_by_hand(self):
        context = "a red apple on a wooden table. The apple is green."
        # {apple, green, red} all in the context -> 3/3
        assert grounding("Change the apple's color from green to red", context) == 1.0
        # {cat, sit, apple}: only apple -> 1/3
        assert grounding("Add a cat sitting next to the apple", context) == pytest.approx(1 / 3)
        assert grounding("Fix it.", context) is None


class TestInstructionTarget:
    @pytest.mark.parametrize("instruction,target", [
        ("Remove the extra hand from the person on the left.", "the extra hand"),
        ("Replace the yellow umbrella with a black one.", "the yellow umbrella"),
        ("Change the color of the shirt from green to blue.", "the shirt"),
        ("Make the sky orange and purple at sunset.", "the sky"),
        ("Turn the red car blue", "the red car"),
        ("Please move the lamp to the right side of the desk.", "the lamp"),
        ("Get rid of the second dog", "the second dog"),
        ("Recolor the apple", "the apple"),
    ])
    def test_edits_of_existing_things(self, instruction, target):
        assert instruction_target(instruction) == target

    @pytest.mark.parametrize("instruction", [
        "Add a small boat on the water behind the bridge.",  # new content: absent by design
        "Insert a sign reading OPEN",
        "The sky should be blue",  # no leading edit verb
        "Fix it.",  # nothing named
        "",
    ])
    def test_no_target(self, instruction):
        assert instruction_target(instruction) is None


def test_says_no_issues():
    for text in ["No issues.", "no issues", "None", "No problems found!", "  No misalignment. "]:
        assert says_no_issues(text), text
    for text in ["No issues with the dog, but the cat is missing.", "The apple is green.", ""]:
        assert not says_no_issues(text), text
