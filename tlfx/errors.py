"""Errors that end a command with one clear line and exit code 2."""

import click


class TlfxError(click.ClickException):
    """Bad input or an unmet precondition. The message names the bad value and the fix."""

    exit_code = 2

    def format_message(self):
        return self.message


def unknown_choice(kind: str, value: str, choices) -> TlfxError:
    choices = sorted(choices)
    return TlfxError(f"unknown {kind} {value!r}; valid choices: {', '.join(choices) or '(none registered)'}")
