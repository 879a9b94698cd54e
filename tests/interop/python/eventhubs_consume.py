"""Reads a hub's built-in endpoint with azure-eventhub (the Python Event Hubs SDK).

Environment: EH_CONNECTION_STRING (from `edgehub service-env`), EH_CA (the CA file), EH_WANT
(events to read), EH_GROUP (consumer group, default $Default). Prints the partition ids, one JSON
line per event read from the earliest position, and then the properties of each partition;
exits 0 once EH_WANT events were read, 1 after EH_TIMEOUT seconds (default 60).
"""

import json
import os
import sys
import threading

from azure.eventhub import EventHubConsumerClient


def main():
    want = int(os.environ["EH_WANT"])
    client = EventHubConsumerClient.from_connection_string(
        os.environ["EH_CONNECTION_STRING"],
        consumer_group=os.environ.get("EH_GROUP", "$Default"),
        connection_verify=os.environ["EH_CA"],
    )
    print(json.dumps({"partition_ids": client.get_partition_ids()}), flush=True)
    seen = []
    done = threading.Event()

    def on_event(context, event):
        if event is None:
            return
        system = {
            k.decode() if isinstance(k, bytes) else k: (v.decode() if isinstance(v, bytes) else v)
            for k, v in event.system_properties.items()
        }
        props = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in (event.properties or {}).items()
        }
        seen.append(1)
        print(json.dumps({
            "partition": context.partition_id,
            "sequence_number": event.sequence_number,
            "offset": event.offset,
            "enqueued_time": event.enqueued_time.timestamp() if event.enqueued_time else None,
            "device": system.get("iothub-connection-device-id"),
            "module": system.get("iothub-connection-module-id"),
            "source": system.get("iothub-message-source"),
            "message_id": event.message_id,
            "properties": props,
            "body": b"".join(event.body).decode("utf-8", "replace"),
        }, default=str), flush=True)
        if len(seen) >= want:
            done.set()

    worker = threading.Thread(
        target=client.receive,
        kwargs={"on_event": on_event, "starting_position": "-1", "max_wait_time": 1},
        daemon=True,
    )
    worker.start()
    ok = done.wait(float(os.environ.get("EH_TIMEOUT", "60")))
    for pid in client.get_partition_ids():
        p = client.get_partition_properties(pid)
        print(json.dumps({"partition_properties": p}, default=str), flush=True)
    client.close()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
