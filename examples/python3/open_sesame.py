def handle(ctx, payload):
    if ctx["secrets"].get("password") == "OpenSesame":
        return {"message": "the door opens"}
    return {"message": "the door stays shut"}
