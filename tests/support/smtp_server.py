"""A real SMTP server for the tests: aiosmtpd with STARTTLS required and AUTH.

Usage: smtp_server.py CERT KEY MAILDIR MODEFILE USER PASSWORD [PORT]
(CERT "-" serves plain SMTP without TLS or AUTH, for the email benchmark. With the
environment variable SMTP_IMPLICIT_TLS=1 it serves TLS from the first byte, smtps, with AUTH.)
Prints the port it listens on (127.0.0.1) and serves until killed. Each accepted message is
written to MAILDIR as <n>.eml. The first line of MODEFILE, read on every command, picks the
behaviour: "ok" accepts, "421" answers 421 (try later) to every RCPT, "slow MS" accepts after
MS milliseconds per message (a deliberately slow server). Recipients whose local
part starts with "bounce" get 550 (no such user). It announces PIPELINING (RFC 2920: aiosmtpd
reads pipelined commands one by one from its buffer) unless SMTP_NO_PIPELINING=1.
"""

import asyncio
import os
import signal
import ssl
import sys

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


def main():
    cert, key, maildir, modefile, user, password = sys.argv[1:7]
    os.makedirs(maildir, exist_ok=True)

    def mode():
        try:
            with open(modefile) as f:
                return f.readline().strip()
        except OSError:
            return "ok"

    pipelining = os.environ.get("SMTP_NO_PIPELINING") != "1"

    class Handler:
        count = 0
        pipelined = 0

        async def handle_EHLO(self, server, session, envelope, hostname, responses):
            session.host_name = hostname
            if pipelining:
                responses.insert(-1, "250-PIPELINING")
            return responses

        async def handle_MAIL(self, server, session, envelope, address, mail_options):
            # A pipelining client's RCPT is already in the buffer when its MAIL is read:
            # counted in MAILDIR/pipelined, so that a test can tell the exchange was pipelined.
            if b"RCPT" in bytes(getattr(server._reader, "_buffer", b"")):
                Handler.pipelined += 1
                with open(os.path.join(maildir, "pipelined"), "w") as f:
                    f.write(str(Handler.pipelined))
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            return "250 OK"

        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            if mode() == "421":
                return "421 4.3.0 mailbox busy, try again later"
            if address.split("@")[0].startswith("bounce"):
                return "550 5.1.1 no such user"
            envelope.rcpt_tos.append(address)
            return "250 OK"

        async def handle_DATA(self, server, session, envelope):
            m = mode()
            if m.startswith("slow "):
                await asyncio.sleep(int(m.split()[1]) / 1000)
            Handler.count += 1
            name = os.path.join(maildir, f"{Handler.count:04d}.eml")
            with open(name + ".tmp", "wb") as f:
                f.write(envelope.original_content or envelope.content)
            os.rename(name + ".tmp", name)
            return f"250 2.0.0 OK queued as q{Handler.count}"

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and auth_data.login.decode() == user and auth_data.password.decode() == password
        return AuthResult(success=ok)

    import socket

    if len(sys.argv) > 7:
        port = int(sys.argv[7])
    else:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
    if cert == "-":
        # Plain mode, for the email benchmark: no TLS, no AUTH.
        options = {}
    else:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        options = dict(authenticator=authenticator, auth_required=True)
        if os.environ.get("SMTP_IMPLICIT_TLS") == "1":
            # smtps: the whole session is TLS (aiosmtpd's AUTH-needs-TLS check knows only
            # STARTTLS, so it is off here; the connection is encrypted all the same).
            options.update(ssl_context=ctx, auth_require_tls=False)
        else:
            options.update(tls_context=ctx, require_starttls=True, auth_require_tls=True)
    controller = Controller(Handler(), hostname="127.0.0.1", port=port, **options)
    controller.start()
    print(controller.port, flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    controller.stop()


if __name__ == "__main__":
    main()
