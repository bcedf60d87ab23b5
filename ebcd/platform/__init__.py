"""The platform above (city or province): EBD packages over HTTP, both ways (`[ebd]` in the config).

`mapping` and `reports` are pure (an EBM as an alert request; alerts and terminals as reports);
`platform` judges what comes down and keeps the outbox of what goes up; `server` and `uplink` are
the HTTP ends (aiohttp). The codec is `ebcd.protocols.ebd`.
"""
