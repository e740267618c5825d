# nbd-s3 %postun: reload unit files; on upgrade restart the daemon if it was running.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -ge 1 ]; then
    systemctl try-restart nbd-s3.service >/dev/null 2>&1 || :
fi
