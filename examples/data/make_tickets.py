"""Generate the example classification task: route a customer-support message to billing, technical, account or
shipping.

The held-out messages (tickets_eval.jsonl) use products, amounts and phrasings that never occur in training
(tickets_train.jsonl), and every label shares words with the others (an order, a charge, an app), so accuracy on them
shows whether the classifier learned the task rather than the examples. Run: python make_tickets.py
"""

import json
import random
from pathlib import Path

LABELS = ("billing", "technical", "account", "shipping")

TEMPLATES = {
    "billing": [
        "I was charged twice for my {product} this month, can you refund one of them?",
        "Why does my invoice say {amount} when the plan is cheaper?",
        "The {product} subscription renewed even though I cancelled it. I want my money back.",
        "My card was billed {amount} for an order I never placed.",
        "Can I get a receipt with our company VAT number for the {product}?",
        "The discount code was not applied and I paid full price ({amount}).",
        "Please switch me to yearly billing for the {product}.",
        "There is a charge of {amount} on my statement that I do not recognise.",
    ],
    "technical": [
        "The {product} app crashes every time I open the settings page.",
        "I get error {code} when I try to sync my {product}.",
        "My {product} will not connect to wifi after the last update.",
        "The screen of the {product} stays black although the light is on.",
        "Uploading files fails halfway with a timeout, code {code}.",
        "Since the update the {product} drains its battery in two hours.",
        "Notifications stopped working on my {product}, I reinstalled it twice.",
        "The page keeps loading forever when I press export on the {product}.",
    ],
    "account": [
        "I cannot log in, the password reset email never arrives.",
        "How do I change the email address on my account to {email}?",
        "Please delete my account and all the data you hold about me.",
        "Someone else signed into my account from another country, lock it please.",
        "I want to add my colleague {name} as a second user on our account.",
        "My two-factor codes are on my old phone, how do I get back in?",
        "Can you merge my two accounts? One uses {email}.",
        "I would like to change the name on my profile to {name}.",
    ],
    "shipping": [
        "My {product} order has not arrived after {days} days.",
        "The tracking number for my {product} shows no movement since Monday.",
        "The parcel arrived damaged, the {product} box was crushed.",
        "Can you ship the {product} to a different address, my office in {city}?",
        "The courier left my package at the wrong door in {city}.",
        "Do you deliver to {city}, and how long does it take?",
        "I received someone else's parcel instead of my {product}.",
        "The delivery was marked as done but nothing came, order for a {product}.",
    ],
}
# Never in training: the held-out messages use these phrasings and names only.
EVAL_TEMPLATES = {
    "billing": [
        "You took {amount} from my account for the {product} but I am on the free tier.",
        "Is there a way to pay the {product} invoice by bank transfer instead of card?",
        "I see the same {amount} payment three times on my bank app, please fix it.",
    ],
    "technical": [
        "After restarting, the {product} shows code {code} and freezes.",
        "Bluetooth pairing with my {product} fails every single time.",
        "The {product} app logs me out and shows a blank white page, error {code}.",
    ],
    "account": [
        "My username is wrong, please rename the account to {name}.",
        "I forgot which email I registered with, maybe {email}? I cannot get in.",
        "Turn off the account of my former employee {name} today.",
        "The verification link for {email} says it expired, how do I confirm my sign-up?",
        "Please give {name} admin rights on our workspace.",
    ],
    "shipping": [
        "It has been {days} days and the {product} is still not here, where is it?",
        "The box with my {product} was left in the rain and is soaked.",
        "Please send the {product} to my sister in {city} instead of my home.",
    ],
}
TRAIN_FILL = {
    "product": ["smart speaker", "fitness watch", "router", "tablet", "camera", "photo plan", "team plan", "e-reader"],
    "amount": ["$19.99", "$45", "EUR 12", "$120", "GBP 30", "$7.50"],
    "code": ["E102", "503", "X-17", "0x80070005", "SYNC-4"],
    "email": ["ana@example.com", "raj@example.org", "lee@example.net"],
    "name": ["Marta Lopez", "Ken Ito", "Sam Reed", "Ola Nowak"],
    "days": ["5", "9", "12", "three"],
    "city": ["Leeds", "Porto", "Lyon", "Graz"],
}
EVAL_FILL = {
    "product": ["baby monitor", "drone", "doorbell camera", "cloud backup"],
    "amount": ["$64", "CHF 25", "$3.99"],
    "code": ["F-9", "429", "NET-2"],
    "email": ["mo@example.com", "tia@example.org", "ravi@example.net"],
    "name": ["Juho Virta", "Ama Owusu", "Lea Brun", "Tom Hart"],
    "days": ["ten", "15"],
    "city": ["Gdansk", "Bilbao"],
}


# Label-neutral openings and endings, as real messages have them.
OPENINGS = ["", "Hi, ", "Hello team, ", "Urgent: ", "Good morning. ", "Quick question: "]
ENDINGS = ["", " Thanks.", " Thank you!", " Regards, a long-time customer.", " Please help."]


def rows(templates, fill, per_label, rng):
    """per_label distinct messages of each label, shuffled."""
    made = []
    for label in LABELS:
        texts = set()
        while len(texts) < per_label:
            body = rng.choice(templates[label]).format(**{k: rng.choice(v) for k, v in fill.items()})
            opening = rng.choice(OPENINGS)
            if opening.endswith(", "):
                body = body[0].lower() + body[1:]
            texts.add(opening + body + rng.choice(ENDINGS))
        made += [{"text": text, "label": label} for text in sorted(texts)]
    rng.shuffle(made)
    return made


def main():
    rng = random.Random(7)
    here = Path(__file__).parent
    for name, templates, fill, count in (("tickets_train", TEMPLATES, TRAIN_FILL, 80),
                                         ("tickets_eval", EVAL_TEMPLATES, EVAL_FILL, 20)):
        with open(here / f"{name}.jsonl", "w") as f:
            for row in rows(templates, fill, count, rng):
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
