from dataclasses import dataclass

import pgpubsub
from pgpubsub.channel import Channel
from pgpubsub.durable import connection


@dataclass
class WelcomeEmail(Channel, name="welcome", lock_notifications=True, max_attempts=5):
    """Stored with the signup, in its transaction; handled exactly once by a worker."""

    email: str


@pgpubsub.listener(WelcomeEmail)
def send_welcome(email: str) -> None:
    # (send the email here: external effects are at-least-once, make them idempotent)
    # The claim transaction: this update commits with the message's completion.
    connection().execute("UPDATE signup SET welcomed = true WHERE email = %s", (email,))
