"""ServerlessBench's Alexa skill, stage 1: the front end turns an utterance into an intent."""

INTENTS = {
    "open": ("door", "open"), "close": ("door", "close"), "lock": ("door", "lock"),
    "lights": ("light", "on"), "dark": ("light", "off"), "watch": ("tv", "on"),
    "charge": ("plug", "on"), "unplug": ("plug", "off"),
}


def handler(event, context):
    words = str(event.get("utterance", "")).lower().replace(",", " ").split()
    commands = [{"device": INTENTS[w][0], "action": INTENTS[w][1]} for w in words if w in INTENTS]
    return {"user": event.get("user", "anonymous"), "utterance": event.get("utterance", ""),
            "commands": commands}
