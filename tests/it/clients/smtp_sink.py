"""A real SMTP server on loopback for the e-mail delivery tests (aiosmtpd), and a reader of
what it received.

  smtp_sink.py serve PORT OUT_DIR CERT KEY USER PASSWORD
      STARTTLS required, AUTH (PLAIN/LOGIN) required after it; each message is saved as
      OUT_DIR/N.eml. Prints "ready" when it accepts connections.
  smtp_sink.py read FILE.eml
      Prints JSON: subject, sender, recipients, the text body and each attachment (with the
      sheets of a workbook as openpyxl reads them)."""

import email
import email.policy
import io
import json
import os
import ssl
import sys
import time


def serve(port, out, cert, key, user, password):
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    class Handler:
        def __init__(self):
            self.n = 0

        async def handle_DATA(self, server, session, envelope):
            self.n += 1
            tmp = os.path.join(out, f".{self.n}.eml")
            with open(tmp, "wb") as f:
                f.write(envelope.original_content or envelope.content)
            os.rename(tmp, os.path.join(out, f"{self.n}.eml"))
            return "250 OK"

    def authenticate(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == user.encode()
            and auth_data.password == password.encode()
        )
        return AuthResult(success=ok, handled=False)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    controller = Controller(
        Handler(),
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        authenticator=authenticate,
        auth_required=True,
        auth_require_tls=True,
    )
    controller.start()
    print("ready", flush=True)
    while True:
        time.sleep(1)


def read(path):
    import openpyxl

    with open(path, "rb") as f:
        msg = email.message_from_binary_file(f, policy=email.policy.default)
    out = {
        "subject": msg["subject"],
        "from": msg["from"],
        "to": msg["to"],
        "body": msg.get_body(preferencelist=("plain",)).get_content(),
        "attachments": [],
    }
    for part in msg.iter_attachments():
        data = part.get_payload(decode=True)
        item = {"name": part.get_filename(), "type": part.get_content_type(), "bytes": len(data)}
        if item["name"].endswith(".xlsx"):
            wb = openpyxl.load_workbook(io.BytesIO(data))
            item["sheets"] = wb.sheetnames
            item["summary_b5"] = wb["Summary"]["B5"].value
        out["attachments"].append(item)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), *sys.argv[3:8])
    else:
        read(sys.argv[2])
