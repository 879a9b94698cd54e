"""A module built with the Python device SDK (azure-iot-device, MQTT only), created from the edge
environment as IoT Edge modules are (EdgeHubConnectionString + EdgeModuleCACertificateFile).

Driven by tests/interop/python.test.js over stdin/stdout: it prints one JSON line per event and
waits for the test's go-ahead lines between steps, so the test decides the order.
"""
import json
import sys
import threading

from azure.iot.device import IoTHubModuleClient, Message, MethodResponse

WAIT = 30


def say(**event):
    print(json.dumps(event), flush=True)


def fail(why):
    say(event="error", why=why)
    sys.exit(1)


def main():
    client = IoTHubModuleClient.create_from_edge_environment()
    client.connect()
    inputs = []
    got_input = threading.Event()
    desired = []
    got_desired = threading.Event()

    def on_message(msg):
        inputs.append(
            {
                "input": msg.input_name,
                "data": msg.data.decode(),
                "mid": msg.message_id,
                "props": dict(msg.custom_properties),
            }
        )
        got_input.set()

    def on_method(request):
        payload = {"got": request.payload, "method": request.name}
        client.send_method_response(MethodResponse.create_from_method_request(request, 200, payload))

    def on_patch(patch):
        desired.append(patch)
        got_desired.set()

    client.on_message_received = on_message
    client.on_method_request_received = on_method
    client.on_twin_desired_properties_patch_received = on_patch

    twin = client.get_twin()
    client.patch_twin_reported_properties({"python": True})
    twin = client.get_twin()
    say(event="twin", desired_version=twin["desired"]["$version"], reported=twin["reported"].get("python"))

    msg = Message(json.dumps({"t": 1}))
    msg.message_id = "py-1"
    msg.content_type = "application/json"
    msg.content_encoding = "utf-8"
    msg.custom_properties["alert"] = "high"
    client.send_message_to_output(msg, "out1")
    say(event="sent")

    if not got_input.wait(WAIT):
        fail("no input message")
    say(event="input", **inputs[0])

    if not got_desired.wait(WAIT):
        fail("no desired patch")
    say(event="desired", patch=desired[-1])

    # The test calls a method now, then says when to stop.
    sys.stdin.readline()
    client.shutdown()
    say(event="done")


if __name__ == "__main__":
    main()
