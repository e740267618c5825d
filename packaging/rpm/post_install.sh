# nbd-s3 %post: service user, state directory; enable (not start) on first install.
if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers /usr/lib/sysusers.d/nbd-s3.conf || :
elif ! getent passwd nbd-s3 >/dev/null; then
    useradd --system --user-group --home-dir /var/lib/nbd-s3 --no-create-home \
        --shell /sbin/nologin --comment "nbd-s3 daemon" nbd-s3 || :
fi
install -d -m 0750 -o nbd-s3 -g nbd-s3 /var/lib/nbd-s3 || :
if command -v systemd-tmpfiles >/dev/null 2>&1; then
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/nbd-s3.conf || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ]; then
    systemctl enable nbd-s3.service >/dev/null 2>&1 || :
fi
