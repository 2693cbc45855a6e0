"""The demo eval's conversation mode: questions about one picture asked in order, each reply in the
history of the next, first questions and follow-ups scored apart."""

from __future__ import annotations

from hybrid.demo import scenes
from hybrid.demo.eval import MAX_QUESTIONS, conversation_exchanges, evaluate_conversations


def test_conversations_cover_every_question_of_every_scene_once():
    conversations = conversation_exchanges(12, seed=3)
    assert all(1 <= len(c) <= MAX_QUESTIONS for c in conversations)
    assert all(len({id(e.scene) for e in c}) == 1 for c in conversations), "one picture per conversation"
    asked = [e for c in conversations for e in c]
    scenes_seen = list(dict.fromkeys(id(e.scene) for e in asked))
    assert len(scenes_seen) == 12
    for scene_id in scenes_seen:
        scene = next(e.scene for e in asked if id(e.scene) == scene_id)
        kinds = sorted(e.kind for e in asked if id(e.scene) == scene_id)
        assert kinds == sorted(k for k in scenes.IMAGE_KINDS if scenes.askable(k, scene))
    assert any(len(c) > 1 for c in conversations)


def test_each_reply_is_in_the_history_of_the_next_and_follow_ups_are_scored_apart():
    conversations = conversation_exchanges(9, seed=4)
    seen = []

    asked = iter([e for c in conversations for e in c])

    def answer(image, question, history=()):
        seen.append((image is not None, question, history))
        right = next(asked).answer
        return right if not history else "I do not know."  # right first, wrong after

    report = evaluate_conversations(answer, conversations)
    first = [c[0] for c in conversations]
    assert all(has_image for has_image, _, _ in seen)
    turns = [
        (turn, exchange, conversation) for conversation in conversations for turn, exchange in enumerate(conversation)
    ]
    for (turn, exchange, conversation), (_, question, history) in zip(turns, seen, strict=True):
        assert question == exchange.question
        assert [q for q, _ in history] == [e.question for e in conversation[:turn]]
        assert all(reply == "I do not know." for _, reply in history[1:]), "the replies themselves are the history"
    assert all(score.accuracy == 1.0 for score in report.first.values())
    assert all(score.accuracy == 0.0 for score in report.follow_up.values())
    assert sum(s.total for s in report.first.values()) == len(first)
    assert set(report.to_json()["follow_up"]) == set(report.follow_up)
