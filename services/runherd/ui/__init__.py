"""`runherd ui`: a read-only web view of runs, attempts, the queue and the fleet, served by the
runherd process itself (aiohttp + Jinja2, server-rendered; a little inline JavaScript follows the
`runherd.status` topic through server-sent events). See server.py."""
