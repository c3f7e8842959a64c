"""The deterministic fact judge against hand-labelled answers."""

import pytest

from offside.eval.judge import is_refusal, states

# (answer, value, field, states the value?) — labelled by hand.
LABELLED = [
    # money
    ("The transfer fee was €63.50m.", "€63.50m", "transfer_fee", True),
    ("It cost 63.5 million euros.", "€63.50m", "transfer_fee", True),
    ("EUR 63,500,000 was paid.", "€63.50m", "transfer_fee", True),
    ("The fee was €63.5M", "€63.50m", "transfer_fee", True),
    ("The transfer fee was €103.50m.", "€63.50m", "transfer_fee", False),
    ("The transfer fee was €6.35m.", "€63.50m", "transfer_fee", False),
    ("His market value was €106.25m.", "€106.25m", "market_value", True),
    # dates
    ("The transfer took place on 18 August 2024.", "18 August 2024", "transfer_date", True),
    ("It happened on August 18, 2024.", "18 August 2024", "transfer_date", True),
    ("2024-08-18", "18 August 2024", "transfer_date", True),
    ("on 18/08/2024", "18 August 2024", "transfer_date", True),
    ("on the 18th of Aug 2024", "18 August 2024", "transfer_date", True),
    ("The transfer took place on 8 June 2024.", "18 August 2024", "transfer_date", False),
    ("The transfer took place on 18 August 2023.", "18 August 2024", "transfer_date", False),
    ("He was born on 1 February 1996.", "1 February 1996", "birth_date", True),
    # numbers
    ("The number of trophies he won at the club is 5.", "5", "trophies", True),
    ("He won five trophies there.", "5", "trophies", True),
    ("He won 15 trophies.", "5", "trophies", False),
    ("He did not win 5 trophies.", "5", "trophies", False),
    ("He is 28 years old.", "28", "age", True),
    ("He is 1.72 m tall.", "1.72 m", "height", True),
    ("He is 172 cm tall.", "1.72 m", "height", True),
    ("He is 1.82 m tall.", "1.72 m", "height", False),
    # clubs and synonyms
    ("He is going to play for Ashby Rovers.", "Ashby Rovers", "club_to", True),
    ("He is going to play for ashby rovers fc", "Ashby Rovers", "club_to", True),
    ("Ashby, I think.", "Ashby Rovers", "club_to", True),
    ("He is going to play for Thornbury County.", "Ashby Rovers", "club_to", False),
    ("He is not going to play for Ashby Rovers.", "Ashby Rovers", "club_to", False),
    ("He signed for Man Utd.", "Manchester United", "club_to", True),
    ("He joined Spurs.", "Tottenham Hotspur", "club_to", True),
    ("He transferred from Manchester City.", "Manchester United", "club_from", False),
    ("He moved to Manchester.", "Manchester United", "club_to", False),
    ("He joined PSG in the summer.", "Paris Saint-Germain", "club_to", True),
    # other text
    ("His nationality is Brennic.", "Brennic", "nationality", True),
    ("His position is defensive midfielder.", "defensive midfielder", "position", True),
    ("His position is striker.", "defensive midfielder", "position", False),
    # refusals and empty answers
    ("I do not know the answer.", "Ashby Rovers", "club_to", False),
    ("I don't know, maybe Ashby Rovers.", "Ashby Rovers", "club_to", False),
    ("", "5", "trophies", False),
]


@pytest.mark.parametrize(("answer", "value", "field", "expected"), LABELLED)
def test_judge_matches_hand_labels(answer, value, field, expected):
    assert states(answer, value, field) is expected


@pytest.mark.parametrize("answer", ["I do not know the answer.", "I cannot answer that.", "I have no information about him.",
                                    "Sorry, I don't recall."])
def test_refusals(answer):
    assert is_refusal(answer)


def test_a_plain_answer_is_no_refusal():
    assert not is_refusal("He is going to play for Ashby Rovers.")
