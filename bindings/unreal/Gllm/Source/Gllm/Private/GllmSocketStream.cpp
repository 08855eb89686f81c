#include "GllmSocketStream.h"

#include "HAL/PlatformProcess.h"
#include "IPAddress.h"
#include "SocketSubsystem.h"
#include "Sockets.h"

#include <atomic>
#include <string>

namespace
{
class FGllmSocketStream final : public gllm::ByteStream
{
public:
	~FGllmSocketStream() override { close(); }

	bool connect(const std::string& Host, uint16_t Port, int TimeoutMs, std::string* Error) override
	{
		close();
		ISocketSubsystem* Subsystem = ISocketSubsystem::Get(PLATFORM_SOCKETSUBSYSTEM);
		if (!Subsystem) { return Fail(Error, "no socket subsystem"); }
		FAddressInfoResult Info = Subsystem->GetAddressInfo(UTF8_TO_TCHAR(Host.c_str()), nullptr,
			EAddressInfoFlags::Default, NAME_None, ESocketType::SOCKTYPE_Streaming);
		if (Info.ReturnCode != SE_NO_ERROR || Info.Results.Num() == 0) { return Fail(Error, "cannot resolve " + Host); }
		TSharedRef<FInternetAddr> Addr = Info.Results[0].Address;
		Addr->SetPort(Port);
		Socket = Subsystem->CreateSocket(NAME_Stream, TEXT("gllm"), Addr->GetProtocolType());
		if (!Socket) { return Fail(Error, "cannot create a socket"); }
		Socket->SetNoDelay(true);
		Socket->SetNonBlocking(true);
		Socket->Connect(*Addr);   // in progress: wait for it to be writable
		const double Deadline = FPlatformTime::Seconds() + TimeoutMs / 1000.0;
		while (FPlatformTime::Seconds() < Deadline)
		{
			if (Woken.exchange(false)) { close(); return Fail(Error, "interrupted"); }
			if (Socket->Wait(ESocketWaitConditions::WaitForWrite, FTimespan::FromMilliseconds(2)))
			{
				if (Socket->GetConnectionState() == SCS_Connected) { return true; }
				break;
			}
			if (Socket->GetConnectionState() == SCS_ConnectionError) { break; }
		}
		close();
		return Fail(Error, "connect failed or timed out");
	}

	bool write_all(const uint8_t* Data, size_t Size, std::string* Error) override
	{
		size_t Sent = 0;
		while (Socket && Sent < Size)
		{
			int32 N = 0;
			if (!Socket->Send(Data + Sent, (int32)FMath::Min<size_t>(Size - Sent, 1 << 20), N))
			{
				return Fail(Error, "send failed");
			}
			if (N == 0) { Socket->Wait(ESocketWaitConditions::WaitForWrite, FTimespan::FromMilliseconds(100)); }
			Sent += (size_t)N;
		}
		return Socket != nullptr || Fail(Error, "not connected");
	}

	long read_some(uint8_t* Buf, size_t Capacity, int TimeoutMs, std::string* Error) override
	{
		if (!Socket) { Fail(Error, "not connected"); return -1; }
		// FSocket::Wait cannot be woken: wait in 2 ms slices and check the wake flag between them.
		const double Deadline = FPlatformTime::Seconds() + TimeoutMs / 1000.0;
		uint32 Pending = 0;
		while (!Socket->HasPendingData(Pending))
		{
			if (Socket->GetConnectionState() == SCS_ConnectionError) { Fail(Error, "the connection failed"); return -1; }
			if (Woken.exchange(false) || FPlatformTime::Seconds() >= Deadline) { break; }
			Socket->Wait(ESocketWaitConditions::WaitForRead, FTimespan::FromMilliseconds(2));
		}
		int32 Read = 0;
		if (!Socket->Recv(Buf, (int32)FMath::Min<size_t>(Capacity, 1 << 20), Read, ESocketReceiveFlags::None))
		{
			const ESocketErrors Err = ISocketSubsystem::Get(PLATFORM_SOCKETSUBSYSTEM)->GetLastErrorCode();
			if (Err == SE_EWOULDBLOCK || Err == SE_NO_ERROR) { return 0; }
			Fail(Error, "the server closed the connection");
			return -1;
		}
		return (long)Read;
	}

	void wake() override { Woken.store(true); }

	void close() override
	{
		if (Socket)
		{
			Socket->Close();
			ISocketSubsystem::Get(PLATFORM_SOCKETSUBSYSTEM)->DestroySocket(Socket);
			Socket = nullptr;
		}
	}

private:
	static bool Fail(std::string* Error, const std::string& Why)
	{
		if (Error) { *Error = Why; }
		return false;
	}

	FSocket* Socket = nullptr;
	std::atomic<bool> Woken{false};
};
}  // namespace

std::unique_ptr<gllm::ByteStream> MakeGllmSocketStream()
{
	return std::unique_ptr<gllm::ByteStream>(new FGllmSocketStream());
}
