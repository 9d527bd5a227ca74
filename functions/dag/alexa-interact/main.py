"""Alexa skill, stage 2: the dialogue step; drops duplicate commands and asks for nothing."""


def handler(event, context):
    seen, commands = set(), []
    for c in event["commands"]:
        key = (c["device"], c["action"])
        if key not in seen:
            seen.add(key)
            commands.append(c)
    reply = "OK" if commands else "Sorry, I did not understand."
    return dict(event, commands=commands, reply=reply)
