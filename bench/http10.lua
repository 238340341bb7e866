-- wrk script: every request is HTTP/1.0 without keep-alive, so the server closes the
-- connection after each reply and wrk connects again (bench/conn_rate.sh: connections/s).
-- A global request() is wrk's documented hook; wrk 4.1 ignores an overridden wrk.request and
-- would send its own HTTP/1.1 keep-alive request. The string is built once per thread.
local req

function init(args)
    req = string.format("GET %s HTTP/1.0\r\nHost: %s\r\n\r\n", wrk.path, wrk.host)
end

function request()
    return req
end
